"""Training under torchrun: 2 gloo ranks on the CPU run the real `enspipe train` command line
and synchronise their gradients (DistributedDataParallel).

The oracle is computed here, not by the trainer: one process replays the epoch's *global*
batches (step k = rank 0's k-th batch + rank 1's k-th batch, read from the ranks' recorded
sample orders) with plain `torch.optim.SGD` from the same initial weights. Synchronised
ranks end with the same weights as each other and as that replay; ranks that train alone
(a model not wrapped in DDP: tests/mutations.py's `ddp-unwrapped`) do not.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from loopback import free_port

N, BATCH, LR, SEED = 512, 32, 0.05, 3
# Tolerances. The ranks hold the all-reduced gradients and so the same weights (measured here:
# bit-identical). The replay sums in another order (gloo's all-reduce of two 32-row means against
# one mean of 64 rows) over 8 SGD steps with momentum: measured max difference 4.5e-8. Ranks that
# never synchronise each train on other samples and differ far beyond either bound.
RANKS_ATOL = 1e-6
REPLAY_ATOL, REPLAY_RTOL = 1e-5, 1e-4

# Run by each rank under torchrun: the real CLI (enspipe.cli.main), with two test seams on the
# model train() builds. It records the model object and its initial weights (rank 0) and, after
# the run, each rank's final weights; and it sets dropout to p=0, so that one process can replay
# the ranks' forward passes exactly (dropout masks are drawn per rank). DDP is untouched.
RANK_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from safetensors.torch import save_file
    import enspipe.train as T
    from enspipe.cli import main

    out, rank, built = sys.argv[1], int(os.environ["RANK"]), []
    load = T.load_model_for

    def capture(*a, **k):
        model = load(*a, **k)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if rank == 0:
            save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, f"{out}/init.safetensors")
        built.append(model)
        return model

    T.load_model_for = capture
    try:
        main(sys.argv[2:])
    except SystemExit as e:
        if e.code:
            raise
    save_file({k: v.contiguous() for k, v in built[0].state_dict().items()}, f"{out}/rank{rank}.safetensors")
""")



def test_two_gloo_ranks_train_the_same_weights_as_one_process_on_the_global_batches(tmp_path):
    from safetensors.torch import load_file

    from enspipe.data import create_dataset
    from enspipe.models import load_model_for

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    run = tmp_path / "run"
    args = ["train", "--model", "D", "--dataset", "digits", "--limit", N, "--epochs", 1, "--batch-size", BATCH,
            "--mode", "clean", "--optimizer", "sgd", "--lr", LR, "--seed", SEED, "--device", "cpu",
            "--record-indices", "--out", run]
    env = {**os.environ, "ENSPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), str(tmp_path),
           *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert (run / "model.safetensors").exists()  # rank 0 wrote the run's model files

    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    init = load_file(tmp_path / "init.safetensors")
    assert set(w0) == set(w1) == set(init)
    # They trained: every rank moved away from the initial weights.
    assert max((w0[k] - init[k]).abs().max().item() for k in init) > 1e-3
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], atol=RANKS_ATOL, rtol=0, msg=f"ranks differ in {k}")

    # The replay: each step's global batch is the ranks' k-th batches together; DDP averages
    # the ranks' mean-loss gradients, which for equal batches is the mean loss over all rows.
    orders = [np.load(run / "indices" / f"rank{r}-epoch0000.npy") for r in range(2)]
    assert len(orders[0]) == len(orders[1]) == N // 2  # every rank the same full batches, together all N
    assert not set(orders[0].tolist()) & set(orders[1].tolist())  # the ranks read disjoint samples
    steps = len(orders[0]) // BATCH
    assert steps >= 4
    ds = create_dataset("digits", limit=N)
    model = load_model_for("D", ds, "cpu")  # the architecture; its weights are the run's initial ones
    model.load_state_dict(init)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for k in range(steps):
        idx = np.concatenate([o[k * BATCH:(k + 1) * BATCH] for o in orders])
        x = ds.images(idx)  # uint8 / 255, as the trainer's batches
        y = torch.from_numpy(ds.labels[idx])
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    replay = model.state_dict()
    print(f"ddp: {steps} steps; max |rank0 - rank1| = {max((w0[k] - w1[k]).abs().max().item() for k in w0):.3g}, "
          f"max |rank0 - replay| = {max((w0[k] - replay[k]).abs().max().item() for k in w0):.3g}")
    for k in w0:
        torch.testing.assert_close(w0[k], replay[k], atol=REPLAY_ATOL, rtol=REPLAY_RTOL,
                                   msg=f"rank 0 differs from one process on the global batches in {k}")
