"""`enspipe evaluate` reads its images through loader workers (`--loader-workers`, `--decoder`), and
what it counts does not depend on them: the errors of a torchvision resnet18 over an ImageFolder of
ImageNet-like JPEGs with 0 and 2 loader workers equal each other and the errors counted here by a
plain loop over PIL-decoded images (tests/jpeg_folders.pil_eval_images) and the same network. A
corrupt JPEG is one line naming the file, a non-zero exit, and no worker process left behind.

The network's convolutions are random; its last layer is fitted here (least squares on its
features) so that it classifies these 40 images right: images paired with another sample's label
would be counted wrong, which random weights alone would not show."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from jpeg_folders import make_jpeg_folder, pil_eval_images
from oracles import clean_and_fgsm_errors

from cli_runner import outputs, spawn

# 40 images: batches of 16, 16 and a partial 8. Five classes: samples 8 apart (a chunk of 8, two loader
# workers) have other labels.
SIZE, BATCH, CLASSES, EPS = 32, 16, 5, 16 / 256
MEAN, STD = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    import torchvision
    from safetensors.torch import save_file

    work = tmp_path_factory.mktemp("eval-loader")
    root = make_jpeg_folder(work / "data", images=40, size=48, classes=CLASSES, split="val", workers=2)
    u8, y = pil_eval_images(root / "val", SIZE)
    x = u8.float() / 255
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=CLASSES).eval()
    fc, net.fc = net.fc, torch.nn.Identity()
    with torch.no_grad():
        feats = torch.cat([net((x - MEAN) / STD), torch.ones(len(x), 1)], 1).double()
        target = 8.0 * F.one_hot(y, CLASSES).double() - 4.0
        w = torch.linalg.lstsq(feats, target, driver="gelsd").solution.float()  # min-norm: fits all 40
        fc.weight.copy_(w[:-1].T)
        fc.bias.copy_(w[-1])
    net.fc = fc
    weights = work / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))

    def model(xb: torch.Tensor) -> torch.Tensor:
        return net((xb - MEAN) / STD)

    clean, fgsm = clean_and_fgsm_errors(model, x, y, EPS, BATCH)  # the oracle: a plain loop in evaluate's batches
    assert clean == 0  # the fitted head classifies every image right: a misplaced label would show
    return {"work": work, "root": root, "weights": weights, "n": len(y), "clean": clean, "fgsm": fgsm}


def _args(setup: dict, root: Path, workers: int, out: Path) -> list:
    return ["evaluate", "--model", "resnet18", "--weights", setup["weights"], "--dataset", f"imagefolder:{root}",
            "--image-size", SIZE, "--device", "cpu", "--attacks", "fgsm", "--eps", "16/256", "--batch-size", BATCH,
            "--loader-workers", workers, "--out", out]


def _evaluate(setup: dict, root: Path, workers: int, out: Path, *more):
    """The command run to its end (forked from the suite's zygote, which leaves with os._exit:
    processes it leaves behind are not reaped by an atexit handler); also the pids of every process
    still holding its stderr file open after it ended (its descendants inherit that descriptor)."""
    proc = spawn(*_args(setup, root, workers, out), *more, log=out.with_suffix(".log"),
                 env={**os.environ, "ENSPIPE_PROGRESS": "0"})
    proc.wait(timeout=600)
    err = out.with_suffix(".err").resolve()
    holders = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(err) for fd in fds):
                holders.add(int(pid))
        except OSError:  # gone, or another user's
            continue
    return proc.returncode, *outputs(proc), holders


def error_line(stderr: str) -> str:
    """The failed command's one error line: its last line on stderr, with no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("enspipe: error: "), stderr
    return lines[-1]


@pytest.fixture(scope="module")
def results(setup) -> dict[int, dict]:
    out = {}
    for workers in (0, 2):
        rc, _, err, holders = _evaluate(setup, setup["root"], workers, setup["work"] / f"w{workers}")
        assert rc == 0, err[-3000:]
        assert not holders, holders
        out[workers] = json.loads((setup["work"] / f"w{workers}" / "results.json").read_text())
    return out


def test_errors_equal_a_plain_loop_over_pil_images_with_any_worker_count(setup, results):
    for workers, res in results.items():
        m = res["models"]["resnet18"]
        assert m["clean"]["n"] == m["whitebox"]["fgsm"]["n"] == setup["n"], workers
        assert m["clean"]["errors"] == setup["clean"], workers
        # The same batches as the loop's, so the same kernels; one sign of a near-zero gradient may still differ.
        assert abs(m["whitebox"]["fgsm"]["errors"] - setup["fgsm"]) <= 1, (workers, setup["fgsm"])
        assert res["config"]["loader_workers"] == workers and res["decoder"] == "cpu"
    assert results[0]["models"] == results[2]["models"]  # bit-identical inputs: identical counts


def test_a_corrupt_jpeg_is_one_line_naming_it_and_leaves_no_worker(setup, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(setup["root"], broken)
    victim = sorted((broken / "val" / "class002").iterdir())[4]  # sample 22: the second batch
    victim.write_bytes(victim.read_bytes()[:60])  # the header survives, the pixels do not
    rc, out, err, holders = _evaluate(setup, broken, 2, tmp_path / "out")
    assert rc == 1, err[-3000:]
    line = error_line(err)
    assert str(victim) in line and "DataLoader" not in line, line
    assert not holders, f"processes left running after evaluate ended: {holders}"
    assert not (tmp_path / "out" / "results.json").exists()


def test_nvjpeg_without_cuda_is_one_line_naming_the_option(setup, tmp_path):
    rc, _, err, _ = _evaluate(setup, setup["root"], 0, tmp_path / "out", "--decoder", "nvjpeg")
    assert rc != 0
    line = error_line(err)
    assert "--decoder nvjpeg" in line and "CUDA" in line, line  # the field, as the CLI names it


def test_the_new_options_keep_the_job_keys_of_existing_evaluate_steps(tmp_path):
    """loader_workers is runtime-only (a step with it keeps the key it had before the option existed:
    the one tests/jobs/test_job_store_keys.py pins); decoder, which can change the pixels, is part of
    the key once it is written."""
    from enspipe.jobs import load_job, resolve_keys

    spec = ('[job]\nname = "keys"\n[data]\ndataset = "digits"\ntrain_limit = 256\ntest_limit = 64\n'
            '[models.static]\narch = "D"\nseed = 1\n[stores.static_test]\nmodel = "static"\nattack = "fgsm"\n'
            'split = "test"\n[models.cand]\narch = "D"\n[evaluate.main]\ntargets = ["cand", "static"]\n'
            'attacks = ["fgsm"]\nsource_stores = ["static_test"]\nwhitebox_stores = ["static_test"]\n')
    keys = {}
    for name, extra in (("plain", ""), ("workers", "loader_workers = 3\n"), ("decoder", 'decoder = "nvjpeg"\n')):
        path = tmp_path / f"{name}.toml"
        path.write_text(spec + extra)
        job = load_job(path)
        resolve_keys(job)
        keys[name] = next(s.key for s in job.steps if s.id == "evaluate.main")
    assert keys["plain"][:16] == "031df26b54019978"  # the key before both options existed
    assert keys["workers"] == keys["plain"] and keys["decoder"] != keys["plain"]
