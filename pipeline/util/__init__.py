"""The ground floor: helpers every other floor may use, importing nothing above them but `config`.

errors (the exception types a user sees), fileio (atomic writes, JSON read with caps, folder
locks), naming (names safe as paths), limits (caps on numbers read from files), netcheck (is the
network there), runtime (devices, seeding, progress lines, versions), tarsafe (tar members read
without trusting their headers), _callable (stage modules callable as their stage).
Import the module you need (`from enspipe.util.errors import StoreError`); nothing is re-exported.
"""
__all__: list[str] = []
