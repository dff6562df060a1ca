"""Every model works: the user's commands, as typed, on torchvision and timm BatchNorm nets over an
ImageFolder of small JPEGs, and the paper's ImageNet architectures with local weight files.

The oracles are computed here with plain torch/torchvision/timm (the store's directions, the
evaluated errors), or are fixed values written by the code before the change (the legacy store).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from enspipe.util.errors import ModelError
from enspipe.models import create_model, load_model, weights_sha256
from cli_runner import outputs, run_cli, spawn

CLASSES = ("cat", "dog", "fish")
SIZE = 64  # --image-size: resize to round(64 / 0.875) = 73, center-crop 64
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _cli(*args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    # A real enspipe process, forked from the suite's pre-imported zygote (its imports paid once).
    r = run_cli(*map(str, args), timeout=timeout)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ and val/ class folders of 80x72 JPEGs; each class is tinted its own colour."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet-like")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = (rng.random((72, 80, 3)) * 90).astype(np.uint8)
                a[..., c] += 140
                Image.fromarray(a).save(d / f"{name}_{i:03d}.JPEG", quality=90)
    return root


def _images(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet eval transform, written out with PIL + torchvision (sorted classes, files), in
    the canonical order: classes in turn (every class has as many files, so class-interleaved is a
    round robin: file 0 of each class, then file 1, ...)."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    xs, ys, turn = [], [], []
    for label, name in enumerate(CLASSES):
        for i, f in enumerate(sorted((folder / split / name).iterdir())):
            turn.append((i, label))
            im = Image.open(f).convert("RGB")
            im = TF.center_crop(TF.resize(im, round(SIZE / 0.875), interpolation=InterpolationMode.BILINEAR),
                                [SIZE, SIZE])
            xs.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()))
            ys.append(label)
    order = sorted(range(len(xs)), key=turn.__getitem__)
    return torch.stack([xs[i] for i in order]).float() / 255, torch.tensor([ys[i] for i in order])


def _plain_resnet18(run: Path) -> torch.nn.Module:
    """The run's weights in a bare torchvision resnet18 behind an explicit ImageNet normalization."""
    import torchvision
    from safetensors.torch import load_file

    net = torchvision.models.resnet18(num_classes=len(CLASSES))
    state = load_file(str(run / "model.safetensors"))
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    return _Normalized(net).eval()


class _Normalized(torch.nn.Module):
    """[0, 1] input normalized with ImageNet's mean/std, then the bare network."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


@pytest.fixture(scope="module")
def flow(folder, tmp_path_factory) -> dict[str, Path]:
    """The README's ImageNet-style flow, typed as a user types it."""
    work = tmp_path_factory.mktemp("flow")
    data = ["--dataset", f"imagefolder:{folder}", "--image-size", SIZE, "--device", "cpu"]
    _cli("train", "--model", "resnet18", *data, "--epochs", 1, "--batch-size", 8, "--out", work / "static")
    paths = _cli("precompute", "--model", work / "static", *data, "--format", "both", "--shard-size", 16,
                 "--out", work / "stores").stdout.split()
    zarr, wds = (Path(p) for p in paths)
    _cli("train", "--model", "timm:resnet18", *data, "--mode", "ens-adv", "--shards", zarr, "--epochs", 1,
         "--batch-size", 8, "--eps", "16/256", "--out", work / "ens_zarr")
    _cli("train", "--model", "resnet18", *data, "--mode", "ens-adv", "--shards", wds, "--epochs", 1,
         "--batch-size", 8, "--eps", "16/256", "--out", work / "ens_wds")
    _cli("evaluate", "--model", work / "ens_zarr", "--model", work / "static", "--sources", work / "static",
         "--dataset", f"imagefolder:{folder}", "--image-size", SIZE, "--device", "cpu", "--attacks", "fgsm",
         "--eps", "16/256", "--out", work / "results")
    return {"work": work, "zarr": zarr, "wds": wds}


def test_static_resnet18_directions_equal_a_plain_torch_step_ll(folder, flow):
    """Both stores hold -sign(grad CE(h(x), argmin h(x))) of the static model, computed here."""
    from enspipe.stores import open_store

    model = _plain_resnet18(flow["work"] / "static")
    x, _ = _images(folder, "train")
    x.requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, logits.argmin(1), reduction="sum"), x)
    want = (-grad.sign()).to(torch.int8).numpy()
    for path in (flow["zarr"], flow["wds"]):
        r = open_store(path)
        got = r.read(0, len(r))
        assert r.identity.model_name == "resnet18" and r.identity.attack == "step_ll"
        # Batches of 16 here, one batch of 36 above: kernels may differ in the last bits of a
        # near-zero gradient, never in more than a sliver of its signs.
        assert (got["direction"] != want).mean() < 1e-3, path
        np.testing.assert_array_equal(got["label"], logits.argmin(1).numpy())


def test_two_attacks_of_a_batchnorm_net_on_jpegs_are_the_one_attack_stores(folder, flow, tmp_path):
    """`precompute --attacks step_ll,fgsm` (one decode and one forward pass for both, README) of the
    torchvision resnet18 on the ImageFolder of JPEGs: its step_ll store holds the very bytes the
    flow's one-attack precompute wrote, and its fgsm store the sign of the gradient at the
    predicted label (`label` pred, the default: no label leaking) computed here with plain torch."""
    from enspipe.stores import open_store

    data = ["--dataset", f"imagefolder:{folder}", "--image-size", SIZE, "--device", "cpu"]
    paths = _cli("precompute", "--model", flow["work"] / "static", *data, "--attacks", "step_ll,fgsm",
                 "--shard-size", 16, "--out", tmp_path / "stores").stdout.split()
    ll, fgsm = (open_store(p) for p in paths)
    assert (ll.identity.attack, fgsm.identity.attack) == ("step_ll", "fgsm")
    alone = open_store(flow["zarr"])
    for name in ("direction", "logits", "label"):
        np.testing.assert_array_equal(ll.read(0, len(ll))[name], alone.read(0, len(alone))[name], err_msg=name)
    model = _plain_resnet18(flow["work"] / "static")
    x, y = _images(folder, "train")
    x.requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1), reduction="sum"), x)
    got = fgsm.read(0, len(fgsm))
    np.testing.assert_array_equal(got["label"], logits.argmax(1).numpy())
    # As above: other batch sizes may flip a sliver of near-zero gradients' signs, never more.
    assert (got["direction"] != grad.sign().to(torch.int8).numpy()).mean() < 1e-3


def test_ens_adv_trains_with_the_stores_attack_without_attack_flag(flow):
    for run, store in (("ens_zarr", flow["zarr"]), ("ens_wds", flow["wds"])):
        cfg = json.loads((flow["work"] / run / "config.json").read_text())
        assert cfg["train"]["attack"] == "step_ll", run
        assert cfg["stores"][0]["path"] == str(store)
        model = load_model(flow["work"] / run)
        assert model.config.name == ("timm:resnet18" if run == "ens_zarr" else "resnet18")
        # BatchNorm statistics were saved and hash (num_batches_tracked is a 0-dim int64).
        assert any(k.endswith("num_batches_tracked") for k in model.state_dict())
        assert json.loads((flow["work"] / run / "model.json").read_text())["weights_sha256"] == weights_sha256(model)


def test_evaluate_errors_equal_counts_made_here(folder, flow):
    res = json.loads((flow["work"] / "results" / "results.json").read_text())
    x, y = _images(folder, "val")
    static = _plain_resnet18(flow["work"] / "static")
    with torch.no_grad():
        clean_errors = int((static(x).argmax(1) != y).sum())
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(static(xg), y, reduction="sum"), xg)
    x_adv = (x + 16 / 256 * grad.sign()).clamp(0, 1)
    with torch.no_grad():
        fgsm_errors = int((static(x_adv).argmax(1) != y).sum())
    m = res["models"]["static"]
    assert m["clean"]["n"] == len(y) == 12
    assert m["clean"]["errors"] == clean_errors
    assert abs(m["whitebox"]["fgsm"]["errors"] - fgsm_errors) <= 1
    # The black-box column of the static target from itself is its white-box attack.
    assert m["blackbox"]["static"]["fgsm"]["errors"] == m["whitebox"]["fgsm"]["errors"]
    assert set(res["models"]["ens_zarr"]["blackbox"]) == {"static"}


def test_resume_of_a_finished_run_changes_nothing(folder, flow):
    run = flow["work"] / "static"
    files = lambda: {p.relative_to(run): p.read_bytes() for p in run.rglob("*")  # noqa: E731
                     if p.is_file() and p.name != "config.json"}
    before = files()
    r = _cli("train", "--model", "resnet18", "--dataset", f"imagefolder:{folder}", "--image-size", SIZE,
             "--device", "cpu", "--epochs", 1, "--batch-size", 8, "--out", run, "--resume")
    assert r.stdout.strip() == str(run)
    assert files() == before  # the same checkpoint, weights, metrics: no step was taken


def test_killed_mid_epoch_resumes_to_the_uninterrupted_weights(folder, tmp_path):
    from safetensors.torch import load_file

    args = ["train", "--model", "timm:resnet18", "--dataset", f"imagefolder:{folder}", "--image-size", SIZE,
            "--device", "cpu", "--epochs", 3, "--batch-size", 8, "--mode", "adv", "--eps", "16/256", "--seed", 5]
    _cli(*args, "--out", tmp_path / "full")
    run = tmp_path / "killed"
    env = {**os.environ, "ENSPIPE_PROGRESS": "0"}
    p = spawn(*args, "--out", run, env=env, cwd=tmp_path, log=tmp_path / "killed-log")  # forked from the zygote
    deadline = time.time() + 240
    while not (run / "checkpoints" / "epoch-0000.pt").exists():
        assert p.poll() is None, outputs(p)[1]
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # into the second epoch
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=600)
    assert not (run / "checkpoints" / "epoch-0002.pt").exists()
    _cli(*args, "--out", run, "--resume")
    full, resumed = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert full.keys() == resumed.keys() and any(k.endswith("running_var") for k in full)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_precompute_resnet50_from_a_plain_torchvision_safetensors_file(folder, tmp_path):
    import torchvision
    from safetensors.torch import save_file

    from enspipe.stores import open_store

    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=len(CLASSES)).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "resnet50.safetensors"))
    (path,) = _cli("precompute", "--model", "resnet50", "--weights", tmp_path / "resnet50.safetensors",
                   "--dataset", f"imagefolder:{folder}", "--image-size", SIZE, "--limit", 6, "--device", "cpu",
                   "--out", tmp_path / "stores").stdout.split()
    r = open_store(path)
    x, _ = _images(folder, "train")
    model = _Normalized(net)
    x = x[:6].requires_grad_(True)  # --limit 6: the first 6 of the canonical order, two of each class in turn
    logits = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, logits.argmin(1), reduction="sum"), x)
    got = r.read(0, 6)
    assert (got["direction"] != (-grad.sign()).to(torch.int8).numpy()).mean() < 1e-3
    np.testing.assert_allclose(got["logits"].astype(np.float32), logits.detach().numpy(), rtol=2e-3, atol=2e-3)


PAPER_ARCHS = ["inception_v3", "timm:inception_resnet_v2", "timm:inception_v3.tf_adv_in1k",
               "timm:inception_resnet_v2.tf_ens_adv_in1k"]


@pytest.mark.parametrize("name", PAPER_ARCHS)
def test_paper_architectures_load_local_weight_files(name, tmp_path):
    """A bare network's state_dict saved with safetensors (as torchvision/timm users do) loads into
    enspipe's model by name; hashing, saving and reloading keep every tensor."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    if name.startswith("timm:"):
        import timm

        bare = timm.create_model(name[5:], pretrained=False, num_classes=1000)
    else:
        import torchvision

        # torchvision's own inception_v3 carries an aux head; enspipe ignores those tensors.
        bare = torchvision.models.inception_v3(num_classes=1000, aux_logits=True, init_weights=True)
    save_file({k: v.contiguous() for k, v in bare.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = create_model(name, num_classes=1000, weights=tmp_path / "w.safetensors")
    assert model.config.input_size == (3, 299, 299)
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, bare.state_dict()[k]), k
    sha = weights_sha256(model)
    from enspipe.models import save_model

    save_model(model, tmp_path / "run")
    assert weights_sha256(load_model(tmp_path / "run")) == sha


def test_inception_v3_sees_tensorflow_preprocessing():
    """torchvision's hub weights for Inception v3 expect (x - 0.5) / 0.5: enspipe normalizes so."""
    model = create_model("inception_v3", num_classes=10)
    assert model.config.mean == model.config.std == (0.5, 0.5, 0.5)
    assert model.net.transform_input is False and model.net.AuxLogits is None


def test_weights_of_another_head_fail_in_one_line_and_load_with_new_head(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(2)
    bare = torchvision.models.resnet18(num_classes=1000)
    save_file({k: v.contiguous() for k, v in bare.state_dict().items()}, str(tmp_path / "imagenet.safetensors"))
    with pytest.raises(ModelError) as e:
        create_model("resnet18", num_classes=3, weights=tmp_path / "imagenet.safetensors")
    msg = str(e.value)
    assert "\n" not in msg
    assert "fc.weight is 1000x512 in the file but 3x512 in the model" in msg and "`new_head`" in msg
    model = create_model("resnet18", num_classes=3, weights=tmp_path / "imagenet.safetensors", new_head=True)
    own = model.net.state_dict()
    assert own["fc.weight"].shape == (3, 512)
    assert all(torch.equal(own[k], v) for k, v in bare.state_dict().items() if not k.startswith("fc."))
    # Weights of another architecture are not a head problem: no --new-head hint.
    with pytest.raises(ModelError, match="another architecture") as e:
        create_model("resnet34", num_classes=1000, weights=tmp_path / "imagenet.safetensors")
    assert "new_head" not in str(e.value)


def test_new_head_through_the_cli_fine_tunes(folder, tmp_path):
    import torchvision
    from safetensors.torch import save_file

    bare = torchvision.models.resnet18(num_classes=1000)
    save_file({k: v.contiguous() for k, v in bare.state_dict().items()}, str(tmp_path / "in1k.safetensors"))
    base = ["train", "--model", "resnet18", "--weights", tmp_path / "in1k.safetensors", "--dataset",
            f"imagefolder:{folder}", "--image-size", SIZE, "--limit", 8, "--epochs", 1, "--device", "cpu"]
    r = _cli(*base, "--out", tmp_path / "a", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "--new-head" in r.stderr
    assert not (tmp_path / "a" / "model.safetensors").exists()
    _cli(*base, "--new-head", "--out", tmp_path / "b")
    assert load_model(tmp_path / "b").config.num_classes == len(CLASSES)


@pytest.mark.parametrize("argv, message", [
    (["--shards", ""], "--shards needs a store path, got an empty one"),
])
def test_empty_shards_is_one_line(tmp_path, argv, message):
    r = _cli("train", "--model", "D", "--mode", "ens-adv", *argv, "--out", tmp_path / "r", check=False)
    assert r.returncode == 1 and r.stderr.strip() == f"enspipe: error: {message}"
    assert not (tmp_path / "r").exists()


def test_stores_of_two_attacks_and_a_conflicting_attack_are_refused(digits_static, tmp_path):
    from enspipe.util.errors import StoreError
    from enspipe.precompute import PrecomputeConfig, precompute
    from enspipe.train import TrainConfig, train

    ll, fg = precompute(PrecomputeConfig(model=str(digits_static), out=str(tmp_path / "s"), limit=64,
                                         attacks=("step_ll", "fgsm"), shard_size=64, device="cpu"))
    with pytest.raises(StoreError, match="different attacks"):
        train(TrainConfig(model="D", limit=64, mode="ens-adv", shards=(ll, fg), epochs=1, device="cpu"),
              tmp_path / "r1")
    r = _cli("train", "--model", "D", "--limit", 64, "--mode", "ens-adv", "--shards", ll, "--attack", "fgsm",
             "--device", "cpu", "--out", tmp_path / "r2", check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1
    assert "--attack fgsm conflicts with the stores, which hold step_ll directions" in lines[0]
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    # Paths (what precompute returns) are accepted as shards; the resolved attack is recorded.
    train(TrainConfig(model="D", limit=64, mode="ens-adv", shards=(ll,), epochs=1, device="cpu"), tmp_path / "r3")
    assert json.loads((tmp_path / "r3" / "config.json").read_text())["train"]["attack"] == "step_ll"


def test_a_store_written_before_the_fix_is_reused(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    try:
        from legacy import LEGACY_STORE, LEGACY_WEIGHTS_SHA256, deterministic_d
    finally:
        sys.path.pop(0)
    from enspipe.models import save_model

    model = deterministic_d()
    assert weights_sha256(model) == LEGACY_WEIGHTS_SHA256
    root = tmp_path / "stores"
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "legacy_stores", root)
    save_model(model, tmp_path / "D")
    before = {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}
    r = _cli("precompute", "--model", tmp_path / "D", "--dataset", LEGACY_STORE["dataset"],
             "--limit", LEGACY_STORE["limit"], "--attacks", "step_ll", "--shard-size", LEGACY_STORE["shard_size"],
             "--batch-size", LEGACY_STORE["batch_size"], "--device", "cpu", "--out", root)
    (path,) = r.stdout.split()
    assert r.stderr.splitlines() == [f"reused {path}"]
    assert before == {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


def test_diagnose_a_batchnorm_model_from_the_cli(folder, flow):
    out = flow["work"] / "diag"
    r = _cli("diagnose", "--model", flow["work"] / "static", "--other", flow["work"] / "ens_wds",
             "--dataset", f"imagefolder:{folder}", "--image-size", SIZE, "--limit", 3, "--eps", "16/256",
             "--device", "cpu", "--out", out)
    assert r.stdout.strip() == str(out / "diagnostics.json")
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["n"] == 3 and set(diag["models"]) == {"static"}
    assert diag["models"]["static"]["loss_surface"]["other"] == "ens_wds"


def test_a_job_of_batchnorm_models_on_an_imagefolder(folder, tmp_path):
    spec = tmp_path / "job.toml"
    spec.write_text(f"""
[job]
name = "bn"
[data]
dataset = "imagefolder:{folder}"
image_size = 32
[defaults]
batch_size = 12
epochs = 1
eps = "16/256"
[models.static]
arch = "timm:resnet18"
[stores.static_ll]
model = "static"
attack = "step_ll"
[models.ens]
arch = "resnet18"
mode = "ens-adv"
stores = ["static_ll"]
[evaluate.main]
targets = ["ens"]
sources = ["static"]
attacks = ["step_ll"]
""")
    r = _cli("run", spec, "--out", tmp_path / "out", "--cache", tmp_path / "cache", "--device", "cpu")
    res = json.loads((tmp_path / "out" / "evaluate" / "main" / "results.json").read_text())
    assert res["models"]["ens"]["clean"]["n"] == 12
    cfg = json.loads((tmp_path / "out" / "models" / "ens" / "config.json").read_text())
    assert cfg["train"]["attack"] == "step_ll" and cfg["train"]["mode"] == "ens-adv"
    assert r.stdout.strip().endswith("report.md")


def test_precompute_the_papers_released_v3adv_from_a_local_file(folder, tmp_path):
    """README: `precompute --model timm:inception_v3.tf_adv_in1k --weights FILE --image-size 299
    --format both`; the 1000-class hub model on a 3-class folder is refused, one line."""
    import timm
    from safetensors.torch import save_file

    from enspipe.stores import open_store

    bare = timm.create_model("inception_v3.tf_adv_in1k", pretrained=False, num_classes=len(CLASSES))
    save_file({k: v.contiguous() for k, v in bare.state_dict().items()}, str(tmp_path / "v3adv.safetensors"))
    args = ["precompute", "--weights", tmp_path / "v3adv.safetensors", "--dataset", f"imagefolder:{folder}",
            "--image-size", 299, "--limit", 2, "--format", "both", "--device", "cpu", "--out", tmp_path / "s"]
    paths = _cli(*args, "--model", "timm:inception_v3.tf_adv_in1k").stdout.split()
    assert [Path(p).suffix for p in paths] == [".zarr", ".wds"]
    r = open_store(paths[0])
    assert r.geometry == (3, 299, 299) and r.identity.model_name == "timm:inception_v3.tf_adv_in1k"
    bad = _cli(*args, "--model", "timm:inception_resnet_v2.tf_ens_adv_in1k", check=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert "do not fit timm:inception_resnet_v2.tf_ens_adv_in1k" in bad.stderr
