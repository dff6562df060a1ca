"""The command line end to end, as a user types it (in-process `enspipe.cli.main`), with the
numbers it prints and writes checked against values computed here:

- a 12-class ImageFolder: `train` (with `--optimizer rmsprop --lr-decay`, with `--weights`),
  `precompute --label true --format both`, `ls --json`, and `evaluate` with top-5, a
  `binarized:` target and `--ensemble-source`;
- digits: `diagnose --other` and `report --title --paper mnist`;
- `--augment` through `train()`.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from enspipe.cli import main
from enspipe.data import create_dataset
from enspipe.models import load_model
from cli_runner import in_process as run_cli  # `enspipe ARGS` in this process
from oracles import fgsm_here

CLASSES = 12
SIZE = 12  # --image-size: resize to round(12 / 0.875) = 14, center-crop 12


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def ci(cell: dict) -> str:
    """A summary-table cell: error [95% interval], in %."""
    return f"{pct(cell['error'])} [{pct(cell['ci95'][0])}, {pct(cell['ci95'][1])}]"


def errors_here(model, x, y) -> tuple[int, int]:
    """(top-1 errors, top-5 errors): argmax != y; y not among the 5 largest logits."""
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, dim=1).indices
    return int((logits.argmax(1) != y).sum()), int((top5 != y[:, None]).all(1).sum())


class Binarized(torch.nn.Module):
    """Appendix C.1's baseline written out: the model on 1[x > 0.5]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model((x > 0.5).float())


# --- A 12-class ImageFolder -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def twelve(tmp_path_factory) -> dict[str, Path]:
    """train/ (5 per class) and val/ (3 per class) of 12 classes of 16x16 PNGs, each class its
    own colour."""
    from PIL import Image

    root = tmp_path_factory.mktemp("twelve")
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 3)):
        for c in range(CLASSES):
            d = root / "data" / split / f"class{c:02d}"
            d.mkdir(parents=True)
            colour = np.array([(c * 37) % 256, (c * 91) % 256, (c * 53) % 256])
            for i in range(n):
                a = np.clip(colour + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    return {"root": root, "data": root / "data", "dataset": f"imagefolder:{root / 'data'}"}


def _data(twelve) -> list:
    return ["--dataset", twelve["dataset"], "--image-size", SIZE, "--device", "cpu"]


@pytest.fixture(scope="module")
def twelve_runs(twelve) -> dict[str, Path]:
    """Two models trained on the 12 classes through the CLI: a (Adam, 4 epochs) and b
    (`--optimizer rmsprop --lr-decay 0.5 --lr-decay-every 1`, 3 epochs)."""
    runs = {"a": twelve["root"] / "a", "b": twelve["root"] / "b"}
    flags = {"a": ["--epochs", 4, "--seed", 0],
             "b": ["--epochs", 3, "--seed", 1, "--optimizer", "rmsprop", "--lr-decay", 0.5, "--lr-decay-every", 1]}
    for name, out in runs.items():
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            main([str(a) for a in ["train", "--model", "D", *_data(twelve), "--batch-size", 16, "--log-every", 1000,
                                   *flags[name], "--out", out]])
        assert printed.getvalue().strip() == str(out)
    return runs


def test_train_rmsprop_with_lr_decay(twelve_runs):
    """`--optimizer rmsprop --lr-decay 0.5 --lr-decay-every 1`: RMSProp with the reference
    settings (decay 0.9, eps 1.0) at its default lr 0.045, halved after every epoch, as the
    metrics and the checkpoint record it."""
    out = twelve_runs["b"]
    cfg = json.loads((out / "config.json").read_text())["train"]
    assert (cfg["optimizer"], cfg["lr"], cfg["lr_decay"], cfg["lr_decay_every"]) == ("rmsprop", None, 0.5, 1)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3] and [r["batches"] for r in recs] == [4, 4, 4]
    assert [r["lr"] for r in recs] == pytest.approx([0.045, 0.0225, 0.01125], rel=1e-12)
    state = torch.load(out / "checkpoints" / "epoch-0002.pt", weights_only=True)["optimizer"]
    (group,) = state["param_groups"]
    # The lr is set before each step from (epoch, batch): the checkpoint holds the last step's.
    assert (group["alpha"], group["eps"], group["lr"]) == (0.9, 1.0, pytest.approx(0.045 / 4))
    assert all(set(s) >= {"square_avg", "step"} for s in state["state"].values())
    assert all(float(s["step"]) == 12 for s in state["state"].values())


def test_train_weights_starts_from_them(twelve, twelve_runs, capsys):
    """`--weights RUN` starts from RUN's weights: one epoch of SGD at lr 1e-9 ends within 1e-6 of
    them, where the same run without --weights starts from a fresh initialisation."""
    a = load_model(twelve_runs["a"]).state_dict()
    for weights, out in ((twelve_runs["a"], twelve["root"] / "w"), (None, twelve["root"] / "fresh")):
        extra = ["--weights", weights] if weights else []
        run_cli(capsys, "train", "--model", "D", *_data(twelve), *extra, "--epochs", 1, "--optimizer", "sgd",
                "--lr", "1e-9", "--out", out)
        got = load_model(out).state_dict()
        diff = max(float((got[k].float() - a[k].float()).abs().max()) for k in a)
        assert (diff < 1e-6) if weights else (diff > 0.01), (weights, diff)
    assert json.loads((twelve["root"] / "w" / "config.json").read_text())["train"]["weights"] == str(twelve_runs["a"])


def test_precompute_label_true_and_ls_json(twelve, twelve_runs, capsys):
    """`precompute --label true --format both`: both stores hold the dataset's labels and
    sign(grad CE(h(x), y_true)) computed here (not the prediction's direction); `ls --json`
    lists both with their identity fields, sizes and bits per element as on disk."""
    root = twelve["root"] / "stores"
    stdout, _ = run_cli(capsys, "precompute", "--model", twelve_runs["a"], *_data(twelve), "--attack", "fgsm",
                        "--label", "true", "--format", "both", "--shard-size", 32, "--out", root)
    paths = [Path(p) for p in stdout.split()]
    assert [p.suffix for p in paths] == [".zarr", ".wds"]
    ds = create_dataset(twelve["dataset"], split="train", image_size=SIZE)
    x, y = ds.images(slice(0, len(ds))), torch.as_tensor(ds.labels)
    model = load_model(twelve_runs["a"]).eval()
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xg)
    (gp,) = torch.autograd.grad(F.cross_entropy(model(xg), logits.argmax(1), reduction="sum"), xg)
    want, by_pred = torch.sign(grad).to(torch.int8).numpy(), torch.sign(gp).to(torch.int8).numpy()
    assert (want != by_pred).mean() > 0.05  # the label matters here: the check can tell
    from enspipe.stores import open_store

    for p in paths:
        r = open_store(p)
        got = r.read(0, len(r))
        assert r.identity.label_mode == "true" and len(r) == 60
        np.testing.assert_array_equal(got["label"], ds.labels)
        assert (got["direction"] != want).mean() < 1e-3, p

    stdout, _ = run_cli(capsys, "ls", "--json", root)
    listed = json.loads(stdout)
    assert [Path(i["path"]) for i in listed] == sorted(paths, key=str)
    for info in listed:
        p = Path(info["path"])
        manifest = json.loads((p / "manifest.json").read_text())
        dir_bytes = sum(manifest["shards"][s]["direction_bytes"] for s in manifest["shards"])
        assert {k: info[k] for k in ("fmt", "dataset_split", "model", "attack", "label_mode", "num_samples",
                                     "complete", "shards_done", "num_shards", "problem")} == {
            "fmt": p.suffix[1:], "dataset_split": "train", "model": "D", "attack": "fgsm", "label_mode": "true",
            "num_samples": 60, "complete": True, "shards_done": 2, "num_shards": 2, "problem": None}
        assert info["dataset_source"] == twelve["dataset"]
        assert info["bytes_on_disk"] == sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        assert info["bits_per_element"] == pytest.approx(dir_bytes * 8 / (60 * 3 * SIZE * SIZE))


def test_evaluate_top5_binarized_and_ensemble_source(twelve, twelve_runs, capsys):
    """`evaluate` on the 12-class set: top-1 and top-5 errors (K > 10) of a target and of its
    `binarized-masked:` baseline, clean, white-box and transferred from each source and from
    `--ensemble-source` (the mean of the sources' logits), equal the counts made here; the
    masked binarized target's white-box FGSM does not move (its true zero input gradient), so it
    equals its clean error; the line printed per target carries the same numbers."""
    a, b = str(twelve_runs["a"]), str(twelve_runs["b"])
    out = twelve["root"] / "results"
    stdout, stderr = run_cli(capsys, "evaluate", "--model", a, "--model", f"binarized-masked:{a}", "--sources", a,
                             "--sources", b, "--ensemble-source", *_data(twelve), "--attacks", "fgsm", "--eps", 0.1,
                             "--out", out)
    assert stdout.strip() == str(out / "results.json")
    res = json.loads((out / "results.json").read_text())
    ds = create_dataset(twelve["dataset"], split="test", image_size=SIZE)
    x, y = ds.images(slice(0, len(ds))), torch.as_tensor(ds.labels)
    assert ds.num_classes == CLASSES and len(y) == 36
    ma, mb = load_model(a).eval(), load_model(b).eval()

    class Mean(torch.nn.Module):
        def forward(self, v):
            return (ma(v) + mb(v)) / 2

    x_adv = {s: fgsm_here(m, x, y, 0.1)[0] for s, m in (("a", ma), ("b", mb), ("ensemble(a+b)", Mean()))}
    targets = {"a": ma, "a+binarized-masked": Binarized(ma)}
    assert set(res["models"]) == set(targets)
    for t, net in targets.items():
        m = res["models"][t]
        wb = x if t == "a+binarized-masked" else x_adv["a"]  # no gradient: FGSM leaves x where it is
        cells = [(m["clean"], x), (m["whitebox"]["fgsm"], wb)] + [(m["blackbox"][s]["fgsm"], xa) for s, xa in x_adv.items()]
        for cell, inputs in cells:
            top1, top5 = errors_here(net, inputs, y)
            assert (cell["errors"], cell["n"]) == (top1, 36), (t, cell)
            assert cell["top5_error"] == top5 / 36 and top5 <= top1, (t, cell)
            assert cell["top5_ci95"][0] <= cell["top5_error"] <= cell["top5_ci95"][1]
        line = next(ln for ln in stderr.splitlines() if ln.startswith(f"{t}: "))
        assert line == (f"{t}: clean {100 * m['clean']['error']:.1f}%  fgsm {100 * m['whitebox']['fgsm']['error']:.1f}%"
                        f"  black-box max {100 * m['blackbox_max']:.1f}%")
    assert res["models"]["a+binarized-masked"]["whitebox"]["fgsm"]["errors"] == res["models"]["a+binarized-masked"]["clean"]["errors"]
    assert res["models"]["a"]["blackbox_max"] == max(res["models"]["a"]["blackbox"][s]["fgsm"]["error"]
                                                     for s in ("b", "ensemble(a+b)"))


# --- digits: diagnose --other, report --title --paper -----------------------------------------------

@pytest.fixture(scope="module")
def named(digits_static, digits_static2, tmp_path_factory) -> dict[str, Path]:
    """The session's static models under the paper's names: D (D) and Bstar (B*)."""
    work = tmp_path_factory.mktemp("named")
    out = {"D": work / "D", "Bstar": work / "Bstar"}
    for run, name in ((digits_static, "D"), (digits_static2, "Bstar")):
        out[name].mkdir()
        for f in ("model.safetensors", "model.json"):
            shutil.copy(run / f, out[name] / f)
    out["work"] = work
    return out


def test_diagnose_other_measures_along_the_other_models_direction(named, capsys):
    """`diagnose --model D --other Bstar`: the numbers equal those computed here -- the clean and
    FGSM losses (the loss surface's corners along the signed gradient, the approximation
    ratio's means), the mean input-gradient norms -- and the orthogonal direction is Bstar's."""
    out = named["work"] / "results" / "diag"
    stdout, _ = run_cli(capsys, "diagnose", "--model", named["D"], "--other", named["Bstar"], "--dataset", "digits",
                        "--limit", 8, "--eps", 0.3, "--device", "cpu", "--out", out)
    assert stdout.strip() == str(out / "diagnostics.json")
    diag = json.loads((out / "diagnostics.json").read_text())
    assert (diag["n"], diag["eps"], diag["other_spec"], list(diag["models"])) == (8, 0.3, str(named["Bstar"]), ["D"])
    m = diag["models"]["D"]
    ds = create_dataset("digits", split="test", limit=8)
    x, y = ds.images(slice(0, 8)), torch.as_tensor(ds.labels)
    model = load_model(named["D"]).eval()
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
        fgsm = F.cross_entropy(model(torch.clamp(x + 0.3 * grad.sign(), 0, 1)), y, reduction="none")
    surface = m["loss_surface"]
    assert surface["other"] == "Bstar" and surface["orthogonal"] is True
    assert surface["eps1"][0] == 0 and surface["eps1"][-1] == pytest.approx(0.3)
    loss = np.asarray(surface["loss"])  # [3 points, 21, 21]
    assert loss.shape == (3, 21, 21)
    np.testing.assert_allclose(loss[:, 0, 0], clean[:3].numpy(), rtol=1e-5)
    np.testing.assert_allclose(loss[:, -1, 0], fgsm[:3].numpy(), rtol=1e-5)
    ratio = m["approximation_ratio"]
    assert ratio["loss_clean"] == pytest.approx(float(clean.mean()), rel=1e-5)
    assert ratio["loss_single"] == pytest.approx(float(fgsm.mean()), rel=1e-5)
    assert ratio["ratio"] == pytest.approx(ratio["loss_single"] / ratio["loss_opt"], rel=1e-9)
    flat = grad.flatten(1).double()
    assert m["gradient_norm"]["l1"] == pytest.approx(float(flat.abs().sum(1).mean()), rel=1e-5)
    assert m["gradient_norm"]["l2"] == pytest.approx(float(flat.norm(dim=1).mean()), rel=1e-5)


def test_report_title_and_paper_numbers(named, capsys):
    """`evaluate` then `report --title T --paper mnist` over a folder of results and diagnostics:
    report.md is titled T, prints our errors (those of results.json, in %) beside the paper's
    (Table 7: D's white-box FGSM 92.4; Table 6: D's approximation ratio 49)."""
    folder = named["work"] / "results"
    run_cli(capsys, "evaluate", "--model", named["D"], "--sources", named["Bstar"], "--dataset", "digits",
            "--limit", 64, "--attacks", "fgsm", "--device", "cpu", "--out", folder / "eval")
    if not (folder / "diag" / "diagnostics.json").exists():  # the diagnose test did not run first
        run_cli(capsys, "diagnose", "--model", named["D"], "--other", named["Bstar"], "--dataset", "digits",
                "--limit", 8, "--device", "cpu", "--out", folder / "diag")
    stdout, _ = run_cli(capsys, "report", folder, "--title", "Oracle check", "--paper", "mnist")
    assert stdout.strip() == str(folder / "report.md")
    text = (folder / "report.md").read_text()
    assert text.splitlines()[0] == "# Oracle check: results"
    res = json.loads((folder / "eval" / "results.json").read_text())["models"]["D"]
    clean, fgsm, bb = res["clean"], res["whitebox"]["fgsm"], res["blackbox"]["Bstar"]["fgsm"]
    # The summary row: clean, FGSM (with the paper's column), max and avg black-box.
    assert f"| D | **{ci(clean)}** | **{ci(fgsm)}** | 92.4 | **{ci(bb)}** | **{ci(bb)}** |" in text
    assert f"| D | **{pct(fgsm['error'])} (92.4)** |" in text  # the white-box table
    ar = json.loads((folder / "diag" / "diagnostics.json").read_text())["models"]["D"]["approximation_ratio"]
    assert f"| D | {pct(ar['ratio'])} | 49 | {pct(ar['gap'])} |" in text  # the diagnostics table (Table 6)


# --- --augment through train() --------------------------------------------------------------------

def test_augment_crop_flip_reaches_the_training_step(tmp_path):
    """train(augment="crop+flip") trains on the dataset's images zero-padded by 2, cropped at
    each sample's drawn offset and flipped where drawn -- written out here from the batch's
    recorded parameters -- with offsets spread over all 5x5 and both flip states; the
    adversarial half is taken on the augmented image."""
    from enspipe.train import TrainConfig, adversarial_inputs, train

    ds = create_dataset("digits", limit=128)
    seen = {"offsets": set(), "flips": set()}

    def adversarial(model, batch, cfg, device):
        idx = batch["index"].numpy()
        pad = np.pad(ds.images_uint8(idx), ((0, 0), (0, 0), (2, 2), (2, 2)))
        for i, (dy, dx, flip) in enumerate(batch["aug"].tolist()):
            want = pad[i, :, dy:dy + 28, dx:dx + 28]
            np.testing.assert_array_equal(batch["x"][i].numpy(), want[..., ::-1] if flip else want)
            seen["offsets"].add((dy, dx))
            seen["flips"].add(flip)
        x, y, online = adversarial_inputs(model, batch, cfg, device)
        n = batch["n_adv"]
        assert torch.equal(x[n:], batch["x"][n:].float() / 255)
        return x, y, online

    res = train(TrainConfig(model="D", dataset="digits", limit=128, mode="adv", augment="crop+flip", epochs=2,
                            batch_size=32, device="cpu", log_every=1000), tmp_path / "run", adversarial=adversarial)
    assert res.final["batches"] == 8 and len(seen["offsets"]) == 25 and seen["flips"] == {0, 1}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["augment"] == "crop+flip"
