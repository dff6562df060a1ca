"""train()'s seams: the batch stream, the adversarial inputs and the metrics callback are call
arguments (benchmarks and later streams plug in there instead of patching the module)."""
from __future__ import annotations

import json

import torch

from enspipe.train import TrainConfig, adversarial_inputs, batch_stream, train

CFG = dict(model="D", dataset="digits", limit=128, mode="adv", epochs=2, batch_size=32, log_every=3, seed=3,
           device="cpu")


def _weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def test_the_default_seams_train_exactly_as_without_them(tmp_path):
    """Passing the defaults through the seams (wrapped, to watch them) changes nothing: same
    weights and metrics.jsonl as a plain run; the stream is made once per epoch, the
    adversarial function called once per batch, and on_metrics hears every metrics line."""
    cfg = TrainConfig(**CFG)
    train(cfg, tmp_path / "plain")
    streams, batches, records = [], [], []

    def stream_factory(dataset, cfg, epoch, rank, world):
        streams.append((epoch, rank, world))
        return batch_stream(dataset, cfg, epoch, rank, world)

    def adversarial(model, batch, cfg, device):
        batches.append(len(batch["y"]))
        return adversarial_inputs(model, batch, cfg, device)

    res = train(cfg, tmp_path / "seams", stream_factory=stream_factory, on_metrics=records.append,
                adversarial=adversarial)
    assert streams == [(0, 0, 1), (1, 0, 1)]
    assert sum(batches) == 2 * 128 and len(batches) == res.final["batches"] == 8
    lines = [json.loads(ln) for ln in (tmp_path / "seams" / "metrics.jsonl").read_text().splitlines()]
    assert records == lines and len(lines) == 4  # at steps 3 and 6 (log_every), and each epoch's last window
    plain, seams = _weights(tmp_path / "plain"), _weights(tmp_path / "seams")
    assert all(torch.equal(plain[k], seams[k]) for k in plain)
    config = lambda run: {k: v for k, v in json.loads((run / "config.json").read_text()).items()  # noqa: E731
                          if k != "run_dir"}
    assert config(tmp_path / "plain") == config(tmp_path / "seams")  # seams are not configuration


def test_a_stream_factory_replaces_the_batches(tmp_path):
    """What stream_factory returns is what the loop trains on: here only each epoch's first
    two batches, every one clean (n_adv 0), so no online pass is made."""

    class FirstTwoClean(torch.utils.data.IterableDataset):
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            for i, batch in enumerate(self.inner):
                if i == 2:
                    return
                yield {**batch, "n_adv": 0, "eps": batch["eps"][:0], "d": None}

    res = train(TrainConfig(**CFG), tmp_path / "run",
                stream_factory=lambda *a: FirstTwoClean(batch_stream(*a)))
    assert res.final == {"online_passes": 0, "batches": 4, "samples": 4 * 32}
