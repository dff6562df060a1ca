"""Issue 13: jobs/imagenet_v3_ens3.toml is the paper's Table 3 / 4 setup, and its models build."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from enspipe import jobs
from enspipe.jobs import load_job
from enspipe.jobs.spec import resolved

SPEC = Path(__file__).resolve().parents[2] / "jobs" / "imagenet_v3_ens3.toml"


@pytest.fixture(scope="module")
def job():
    return load_job(SPEC)


def _published(job) -> list:
    return [s for s in job.steps if s.kind == "models" and s.options.get("pretrained")]


def test_the_spec_is_table_3_and_4(job):
    steps = {s.id: s for s in job.steps}
    ev = steps["evaluate.table3"].options
    assert ev["attacks"] == ["step_ll", "rand_step_ll", "fgsm", "iter_fgsm", "pgd_cw"]  # PGD with the CW loss
    assert ev["ensemble_source"] and len(ev["sources"]) == 3
    assert len(ev["attacks"]) * (len(ev["sources"]) + 1) == 20  # §4.2: "20 attacks in total"
    for name in ("v3adv", "v3adv_ens3"):
        o = steps[f"models.{name}"].options
        assert (o["adv_loss"], o["adv_weight"], o["adv_fraction"]) == ("replace", 0.3, 0.5)  # Kurakin et al.
    # The paper's global batch on one device: replicas' batch x 50 replicas (§4.2; Kurakin et al.)
    assert steps["models.v3adv_ens3"].options["batch_size"] * steps["models.v3adv_ens3"].options["grad_accum"] == 800
    assert steps["models.v3adv"].options["batch_size"] * steps["models.v3adv"].options["grad_accum"] == 1600
    statics = {s.name for s in _published(job)}
    assert statics == {"static_v3", "static_resnet_v2_50", "holdout_v4", "holdout_resnet_v1_50",
                       "holdout_resnet_v2_101"}


def test_every_static_and_holdout_model_builds_offline(job):
    """The job's own construction of a `pretrained = true` model (`jobs.published_model`), with
    random weights instead of the hub's: each builds for the job's 299 px geometry (the one its
    stores and evaluation check) and gives 1,000 logits."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 299, 299)
    for step in _published(job):
        model = jobs.published_model(resolved(job, step), pretrained=False).eval()
        assert tuple(model.config.input_size) == (3, 299, 299), step.name
        with torch.no_grad():
            assert model(x).shape == (1, 1000), step.name


@pytest.mark.parametrize("arch", ["inception_v3", "resnet50"])
def test_torchvision_hub_weights_load_through_the_same_path(arch, monkeypatch):
    """With hub weights (`pretrained = true`), torchvision refuses aux_logits / init_weights
    beside them; the download is replaced by a state dict of torchvision's own layout."""
    import torchvision
    from torchvision.models import _api

    fresh = torchvision.models.get_model(arch, weights=None, **({"init_weights": False} if arch == "inception_v3" else {}))
    state = fresh.state_dict()
    monkeypatch.setattr("enspipe.models.hub._network_reachable", lambda host: True)
    monkeypatch.setattr(_api.WeightsEnum, "get_state_dict", lambda self, *a, **k: state)
    model = jobs.published_model({"arch": arch, "image_size": 299}, pretrained=True).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 299, 299)).shape == (1, 1000)
    if arch == "inception_v3":
        assert model.net.AuxLogits is None and not model.net.transform_input  # enspipe normalizes itself
