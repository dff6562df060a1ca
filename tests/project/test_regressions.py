"""The fastest checks that a fixed bug stays fixed (each has a row in tests/mutations.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from enspipe.models import weights_sha256


def test_batchnorm_models_hash_every_tensor():
    """weights_sha256 hashes a BatchNorm net, 0-dim num_batches_tracked included (it once
    raised on viewing a 0-dim tensor as bytes): equal nets hash equal, and a changed counter
    changes the hash."""
    def net() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))

    a, b = net(), net()
    assert a[1].num_batches_tracked.dim() == 0
    assert weights_sha256(a) == weights_sha256(b)
    b[1].num_batches_tracked += 1
    assert weights_sha256(a) != weights_sha256(b)


def test_matrix_products_do_not_depend_on_the_thread_count():
    """A store must not depend on how many threads computed it (a dask worker runs one, the
    in-process run all cores): importing enspipe puts MKL in its strict reproducibility mode,
    so Linear layers give bit-identical outputs on 1 and 2 threads. Without it, on this
    machine's AVX-512 Xeon, 16,484 of 19,200 outputs of a 64x784 @ 784x300 product differ.
    On a CPU without that blocking (this AMD EPYC) both settings agree, so the test also checks
    the setting itself: what a fresh `import enspipe` leaves in MKL_CBWR when the user set none."""
    code = textwrap.dedent("""
        import enspipe, torch
        import torch.nn.functional as F
        g = torch.Generator().manual_seed(0)
        differ = 0
        for m, k, n in ((64, 784, 300), (37, 784, 300), (256, 3200, 128)):
            a, w, b = torch.rand(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
            outs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                outs.append(F.linear(a, w, b))
            differ += int((outs[0] != outs[1]).sum())
        import os
        print(differ, os.environ.get("MKL_CBWR"))
    """)
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}  # enspipe's own setting, not ours
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0", "AUTO,STRICT"], r.stdout
