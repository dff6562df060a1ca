"""The knobs of issues 13, 14 and 17 typed as a user types them, on a BatchNorm torchvision net
over ImageFolder JPEGs: train with the paired loss, lambda, weight decay, a cosine schedule,
validation, a csv log and one kept checkpoint, extend it with --resume --epochs, and evaluate it
with per-attack options and the masked binarization."""
from __future__ import annotations

import csv
import json

from test_every_model import SIZE, _cli, folder  # noqa: F401 -- the JPEG class folders fixture


def test_train_knobs_resume_extension_and_evaluate_attack_options(folder, tmp_path):  # noqa: F811
    data = ["--dataset", f"imagefolder:{folder}", "--image-size", SIZE, "--device", "cpu"]
    run = tmp_path / "run"
    knobs = ["--model", "resnet18", *data, "--mode", "adv", "--adv-loss", "paired", "--adv-fraction", "1",
             "--adv-weight", "0.3", "--weight-decay", "1e-4", "--schedule", "cosine", "--keep-checkpoints", "1",
             "--val-limit", "6", "--log", "csv", "--batch-size", "12", "--out", run]
    _cli("train", *knobs, "--epochs", 1)
    _cli("train", *knobs, "--epochs", 2, "--resume")  # extends the finished run by one epoch
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert (cfg["adv_loss"], cfg["adv_weight"], cfg["adv_fraction"], cfg["weight_decay"], cfg["schedule"],
            cfg["epochs"], cfg["keep_checkpoints"]) == ("paired", 0.3, 1.0, 1e-4, "cosine", 2, 1)
    assert [p.name for p in (run / "checkpoints").glob("epoch-*.pt")] == ["epoch-0001.pt"]  # only the last
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["epoch"] for r in recs}) == [1, 2]
    assert [r["epoch"] for r in recs if r["kind"] == "val"] == [1, 2]  # one validation record per epoch
    with open(run / "metrics.csv") as f:
        assert len(list(csv.reader(f))) > 1

    out = tmp_path / "results"
    _cli("evaluate", "--model", run, "--binarized-masked", run, *data, "--limit", 6, "--eps", "16/256",
         "--attacks", "fgsm,rand_fgsm,pgd_cw", "--attack-option", "rand_fgsm.alpha=0.05",
         "--attack-option", "pgd_cw.kappa=50", "--attack-option", "pgd_cw.steps=3", "--out", out)
    res = json.loads((out / "results.json").read_text())
    params = res["attack_params"]
    assert params["rand_fgsm"]["alpha"] == 0.05 and params["pgd_cw"]["kappa"] == 50 and params["pgd_cw"]["steps"] == 3
    masked = res["models"]["run+binarized-masked"]
    # Its true input gradient is zero: a white-box FGSM cannot move it off its clean error.
    assert masked["whitebox"]["fgsm"]["errors"] == masked["clean"]["errors"]
