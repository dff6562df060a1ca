"""Issue 24: jobs/imagenet_table1.toml, imagenet_table2.toml and imagenet_table4_released.toml
run offline on a tiny ImageNet-shaped folder with weights fabricated at the released models'
shapes (the real ones cannot be downloaded here), and share their models and stores.

The fixture: 1,000 class folders (ImageNet's label space: the models predict 1,000 classes),
three of which hold JPEGs. Each fabricated state dict is timm's / torchvision's own random
initialisation with a classifier bias that makes class 0 the top-1 prediction and class 999
the runner-up, whatever the image: so if the job loads the given file (not a fresh network),
clean and attacked top-1 error are the share of images outside class 0 and top-5 error the
share outside {0, 999}, closed forms the test knows without running the code under test. (The
attacks' arithmetic has its own oracle in evaluate/test_store_as_blackbox_source.py: here the zero head
weight leaves the inputs' gradients zero.)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli

# Six real ImageNet networks on a shared 2-core machine: minutes, not seconds.
pytestmark = pytest.mark.timeout(3000)

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"
WEIGHTS = {"inception_v3.tf_in1k": "timm", "inception_v3.tf_adv_in1k": "timm", "inception_v4.tf_in1k": "timm",
           "inception_resnet_v2.tf_in1k": "timm", "inception_resnet_v2.tf_ens_adv_in1k": "timm",
           "resnet50": "torchvision"}
CLASSES_WITH_IMAGES = (0, 1, 999)
PER_CLASS = 2
STORES = ("v3_step_ll", "v3adv_step_ll", "v4_step_ll", "IRv2_step_ll", "IRv2adv_ens_step_ll",
          "resnet_v1_50_step_ll")


def _fabricate(root: Path) -> dict[str, str]:
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    for c in range(1000):
        d = root / "imagenet" / "val" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(PER_CLASS if c in CLASSES_WITH_IMAGES else 0):
            Image.fromarray(rng.integers(0, 256, (50, 44, 3), dtype=np.uint8)).save(d / f"ILSVRC_{c}_{i}.JPEG")
        # A training split with an image of every class, as ImageNet has: the 997 classes this small
        # validation folder leaves empty keep their labels (with one warning line) instead of being
        # refused as classes no sample has.
        t = root / "imagenet" / "train" / f"n{c:08d}"
        t.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(t / f"n{c:08d}_0.JPEG")
    weights = root / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    for name, family in WEIGHTS.items():
        if family == "timm":
            import timm

            net = timm.create_model(name, pretrained=False)
            head = net.get_classifier()
        else:
            import torchvision

            net = torchvision.models.get_model(name, weights=None)
            head = net.fc
        with torch.no_grad():
            # Random networks' features are huge (timm's Inception: logits ~1e7 before its BN
            # statistics are trained); a zero head weight makes the logits the bias exactly.
            head.weight.zero_()
            head.bias.fill_(-1.0)
            head.bias[0] = 3.0            # top-1: class 0 for every image
            head.bias[999] = 2.0          # top-5: {0, 999, 500, 501, 502}, never class 1
            head.bias[500:503] = 1.0
        # float16 halves the fixture's bytes; load_weights casts into the model's float32
        save_file({k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
                   for k, v in net.state_dict().items()}, str(weights / f"{name}.safetensors"))
    return {"imagenet": str(root / "imagenet"), "weights": str(weights)}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet-fixture")
    # 80 px keeps the Inception networks valid (their minimum is 75) and cheap on a CPU.
    params = {**_fabricate(root), "image_size": 80, "n_attack": 3, "batch_size": 3}
    return root, params


def _sets(params: dict) -> list[str]:
    return [a for k, v in params.items() for a in ("--set", f"{k}={v}")]


def _results(out: Path, step: str) -> dict:
    return json.loads((out / "evaluate" / step / "results.json").read_text())


def _zarr_stores(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "stores").rglob("*.zarr") if p.is_dir())


@pytest.fixture(scope="module")
def runs(fixture):
    """Table 1 through the CLI (a process of its own, `--set`), then Tables 2 and 4 in-process over
    the same cache; the log lines of the last two."""
    from enspipe.jobs import run_job

    root, params = fixture
    cache = root / "cache"
    proc = run_cli("run", str(JOBS / "imagenet_table1.toml"), "--out", str(root / "t1"), "--cache", str(cache),
                   "--device", "cpu", *_sets(params), timeout=1800, cwd=root)  # forked from the zygote
    assert proc.returncode == 0, proc.stderr[-3000:]
    stores_after_1 = _zarr_stores(cache)
    logs: dict[str, list[str]] = {}
    # Table 4 with 2-step I-FGSM and PGD instead of 10 and 40: the same job, in seconds.
    for job, extra in (("imagenet_table2", {}), ("imagenet_table4_released", {"n_clean": 6, "iter_steps": 2,
                                                                             "pgd_steps": 2})):
        logs[job] = []
        run_job(JOBS / f"{job}.toml", out=root / job, cache=cache, device="cpu", params={**params, **extra},
                log=logs[job].append)
    return root, cache, stores_after_1, logs


def test_the_specs_are_the_papers_tables(fixture):
    from enspipe.jobs import load_job

    _, params = fixture
    t1 = {s.id: s for s in load_job(JOBS / "imagenet_table1.toml", params).steps}
    ev = t1["evaluate.table1"].options
    assert ev["targets"] == ["v4", "v3", "v3adv", "IRv2", "IRv2adv_ens"]  # Table 1's order
    assert ev["attacks"] == [] and len(ev["source_stores"]) == 5  # every cell from a store
    assert all(t1[f"stores.{s}"].options["split"] == "test" for s in STORES)
    archs = {t1[f"models.{m}"].options["arch"] for m in ("v3", "v3adv", "v4", "IRv2", "IRv2adv_ens", "resnet_v1_50")}
    assert archs == {f"timm:{n}" for n, f in WEIGHTS.items() if f == "timm"} | {"resnet50"}
    t2 = {s.id: s for s in load_job(JOBS / "imagenet_table2.toml", params).steps}
    assert t2["evaluate.table2"].options["attacks"] == ["rand_step_ll", "iter_ll"]
    t4 = {s.id: s for s in load_job(JOBS / "imagenet_table4_released.toml", params).steps}
    ev4 = t4["evaluate.table4"].options
    assert ev4["sources"] == ["v4", "resnet_v1_50"] and ev4["ensemble_source"]
    assert ev4["attacks"] == ["rand_step_ll", "fgsm", "iter_fgsm", "pgd_cw"]
    assert t4["evaluate.table4_clean"].options["limit"] == 50000  # the whole validation set by default
    defaults = {s.id: s for s in load_job(JOBS / "imagenet_table4_released.toml",
                                          {k: v for k, v in params.items() if k != "n_attack"}).steps}
    assert defaults["evaluate.table4"].options["options"] == {"iter_fgsm": {"steps": 10}, "pgd_cw": {"steps": 40}}


def test_the_stores_are_made_once_and_shared(runs):
    root, cache, stores_after_1, logs = runs
    assert len(stores_after_1) == len(STORES)  # Table 1 made all six, one per model
    assert _zarr_stores(cache) == stores_after_1  # Tables 2 and 4 made none
    for job, used in (("imagenet_table2", STORES[:5]), ("imagenet_table4_released", STORES)):
        text = "\n".join(logs[job])
        for store in used:
            assert f"reused stores.{store} " in text, (job, store)
        assert "running stores." not in text and "running models." not in text, job
    t1 = json.loads((root / "t1" / "job.json").read_text())["steps"]
    t4 = json.loads((root / "imagenet_table4_released" / "job.json").read_text())["steps"]
    for store in STORES:
        assert t1[f"stores.{store}"]["key"] == t4[f"stores.{store}"]["key"]


def test_errors_are_the_closed_forms(runs):
    root, *_ = runs
    n_attack = len(CLASSES_WITH_IMAGES)  # class-stratified: one image of each class
    top1, top5 = 2 / 3, 1 / 3           # outside class 0; outside {0, 999}
    t1 = _results(root / "t1", "table1")
    for target, m in t1["models"].items():
        assert m["clean"]["n"] == n_attack
        assert (m["clean"]["error"], m["clean"]["top5_error"]) == pytest.approx((top1, top5))
        for source, cells in m["blackbox"].items():
            assert (cells["step_ll"]["error"], cells["step_ll"]["top5_error"]) == pytest.approx((top1, top5))
        assert set(m["blackbox"]) == set(t1["models"])  # every source's column, the diagonal included
        assert "step_ll" in m["whitebox"] and m["clean"]["ci95"][0] < top1 < m["clean"]["ci95"][1]
    t2 = _results(root / "imagenet_table2", "table2")
    for m in t2["models"].values():
        assert set(m["whitebox"]) == {"step_ll", "rand_step_ll", "iter_ll"} and m["blackbox"] == {}
    assert t2["attack_params"]["iter_ll"] == {"eps": 0.0625, "steps": 2, "alpha": 0.03125}  # two steps of eps/2
    assert t2["attack_params"]["rand_step_ll"]["alpha"] == 0.03125                          # alpha = eps/2
    t4_params = _results(root / "imagenet_table4_released", "table4")["attack_params"]
    assert t4_params["pgd_cw"]["steps"] == 2 and t4_params["pgd_cw"]["alpha"] == pytest.approx(2.5 * 0.0625 / 2)
    clean = _results(root / "imagenet_table4_released", "table4_clean")
    for m in clean["models"].values():
        assert m["clean"]["n"] == 6 and m["clean"]["error"] == pytest.approx(4 / 6)
    t4 = _results(root / "imagenet_table4_released", "table4")
    assert set(t4["models"]) == {"v3", "v3adv", "IRv2", "IRv2adv_ens"}
    for m in t4["models"].values():
        assert set(m["blackbox"]) == {"v4", "resnet_v1_50", "ensemble(v4+resnet_v1_50)"}
        attacks = sorted(a for per in m["blackbox"].values() for a in per)
        assert len(attacks) == 14 and attacks.count("step_ll") == 2  # the holdouts' stores
        assert m["blackbox_max"] == pytest.approx(top1) and "step_ll" in m["whitebox"]


def test_each_report_compares_with_its_own_table(runs):
    root, *_ = runs
    r1 = (root / "t1" / "report.md").read_text()
    assert "66.7† (60.2)" in r1 and "66.7 (39.2)" in r1   # Table 1: v4's diagonal, v3 -> v4
    assert "51.2" not in r1  # Table 4's max black-box (over its holdouts) is not Table 1's
    r2 = (root / "imagenet_table2" / "report.md").read_text()
    assert "(80.0)" in r2 and "(86.3)" in r2  # v3's R+Step-LL and Iter-LL(2)
    r4 = (root / "imagenet_table4_released" / "report.md").read_text()
    assert "| 22.0 |" in r4 and "| 51.2 |" in r4  # v3's clean and max black-box, Table 4
