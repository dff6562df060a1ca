"""`python -m enspipe` (used by torchrun) is the CLI."""
from enspipe.cli import main

if __name__ == "__main__":
    main()
