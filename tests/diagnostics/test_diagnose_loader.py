"""diagnose reads its images through loader workers (`loader_workers`, PIL): the batch it measures on
is the images decoded here with PIL (tests/jpeg_folders.pil_eval_images) and their labels, in order,
whatever the worker count."""
from __future__ import annotations

import pytest
import torch
from jpeg_folders import make_jpeg_folder, pil_eval_images

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 ImageNet-like JPEGs in 5 classes, a model for them, and the oracle's images and labels."""
    from enspipe.models import create_model, save_model

    root = make_jpeg_folder(tmp_path_factory.mktemp("diag-jpegs"), images=20, size=48, classes=5, split="val",
                            workers=2)
    run = save_model(create_model("C", num_classes=5, input_size=(3, SIZE, SIZE)), tmp_path_factory.mktemp("C"))
    return root, run, pil_eval_images(root / "val", SIZE)


@pytest.mark.parametrize("workers", [0, 2])
def test_diagnose_measures_the_pil_images_and_labels(data, tmp_path, monkeypatch, workers):
    from enspipe.diagnostics import DiagnoseConfig, run_diagnose
    from enspipe.diagnostics import stage

    root, run, (u8, y) = data
    seen = {}

    def capture(models, x, y, **kw):  # the measurements themselves are tests/diagnostics/test_diagnostics.py's
        seen.update(x=x, y=y)
        return {"path": str(kw["out_dir"])}

    monkeypatch.setattr(stage, "diagnose", capture)
    run_diagnose(DiagnoseConfig(models=(str(run),), dataset=f"imagefolder:{root}", image_size=SIZE, limit=20,
                                batch_size=8, device="cpu", loader_workers=workers, out=str(tmp_path / "d")))
    assert torch.equal(seen["x"], u8.float() / 255)
    assert torch.equal(seen["y"], y)
