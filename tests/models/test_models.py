"""Model registry: Table 5 shapes, [0,1] wrapping, checkpoints that never unpickle."""
from __future__ import annotations

import pickle
import socket

import pytest
import torch
from torch import nn

from enspipe import models
from enspipe.util.errors import ModelError
from enspipe.models import MNIST_ARCHS, create_model, load_model, save_model, weights_sha256


def _layers(model, kinds=(nn.Conv2d, nn.Linear, nn.Dropout, nn.MaxPool2d, nn.Tanh, nn.ReLU)):
    return [m for m in model.net if isinstance(m, kinds)]


def _trace_shapes(model, x):
    """Output shape after every conv / linear / pool layer."""
    shapes = []
    for m in model.net:
        x = m(x)
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.MaxPool2d)):
            shapes.append((type(m).__name__, tuple(x.shape[1:])))
    return shapes


# Expected layer outputs for a 1x28x28 input (Keras "valid" unless stated; Table 5).
EXPECTED = {
    "A": [("Conv2d", (64, 24, 24)), ("Conv2d", (64, 20, 20)), ("Linear", (128,)), ("Linear", (10,))],
    "B": [("Conv2d", (64, 14, 14)), ("Conv2d", (128, 5, 5)), ("Conv2d", (128, 1, 1)), ("Linear", (10,))],
    "B*": [("Conv2d", (64, 14, 14)), ("Conv2d", (128, 5, 5)), ("Conv2d", (128, 1, 1)), ("Linear", (10,))],
    "C": [("Conv2d", (128, 26, 26)), ("MaxPool2d", (128, 13, 13)), ("Conv2d", (64, 11, 11)),
          ("MaxPool2d", (64, 5, 5)), ("Linear", (128,)), ("Linear", (10,))],
    "C-code": [("Conv2d", (128, 26, 26)), ("Conv2d", (64, 24, 24)), ("Linear", (128,)), ("Linear", (10,))],
    "D": [("Linear", (300,))] * 4 + [("Linear", (10,))],
}


@pytest.mark.parametrize("name", MNIST_ARCHS)
def test_mnist_architectures_have_the_papers_layer_shapes(name):
    m = create_model(name).eval()
    assert _trace_shapes(m, torch.zeros(2, 1, 28, 28)) == EXPECTED[name]
    convs = [l for l in m.net if isinstance(l, nn.Conv2d)]
    if name in ("B", "B*"):
        assert [c.kernel_size for c in convs] == [(8, 8), (6, 6), (5, 5)]
        assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]
    dropouts = [l.p for l in m.net if isinstance(l, nn.Dropout)]
    assert dropouts == {"A": [0.25, 0.5], "B": [0.2, 0.5], "B*": [0.5], "C": [],
                        "C-code": [0.25, 0.5], "D": [0.5] * 4}[name]
    acts = {type(l) for l in m.net if isinstance(l, (nn.Tanh, nn.ReLU))}
    assert (nn.Tanh in acts) == (name == "C")


def test_models_take_unit_input_and_normalize_inside():
    m = create_model("resnet18", input_size=(3, 32, 32)).eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(m(x), m.net((x - mean) / std))
    gray = create_model("resnet18", input_size=(1, 28, 28)).eval()
    assert gray(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_timm_model_records_its_own_normalization():
    m = create_model("timm:inception_resnet_v2.tf_ens_adv_in1k", num_classes=1000)
    assert m.config.input_size == (3, 299, 299)
    assert m.config.mean == (0.5, 0.5, 0.5) and m.config.std == (0.5, 0.5, 0.5)


def test_checkpoint_round_trip(tmp_path):
    m = create_model("C").eval()
    save_model(m, tmp_path, classes=[str(i) for i in range(10)], provenance={"why": "test"})
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "model.json"}
    back = load_model(tmp_path).eval()
    assert weights_sha256(back) == weights_sha256(m)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(back(x), m(x))
    assert back.provenance["why"] == "test"


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    save_model(create_model("A"), tmp_path)
    with pytest.raises(ModelError, match="for A"):
        create_model("B", weights=tmp_path)
    # A bare safetensors file without its json: the shapes are checked instead.
    (tmp_path / "model.json").unlink()
    with pytest.raises(ModelError, match="do not fit B"):
        create_model("B", weights=tmp_path / "model.safetensors")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/enspipe-pwned",))


def test_a_pickle_checkpoint_is_never_executed(tmp_path):
    marker = "/tmp/enspipe-pwned"
    import os

    if os.path.exists(marker):
        os.unlink(marker)
    bad = tmp_path / "model.pth"
    bad.write_bytes(pickle.dumps({"net.0.weight": _Evil()}))
    with pytest.raises(ModelError):
        create_model("D", weights=bad)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ModelError, match="safetensors"):
        create_model("D", weights=fake)
    assert not os.path.exists(marker)


def test_plain_state_dict_loads_with_weights_only(tmp_path):
    m = create_model("D")
    torch.save(m.net.state_dict(), tmp_path / "w.pth")
    back = create_model("D", weights=tmp_path / "w.pth")
    assert weights_sha256(back) == weights_sha256(m)


def test_pretrained_offline_fails_fast_and_clearly(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)  # the machine is offline
    with pytest.raises(ModelError, match="`weights`"):
        create_model("resnet18", num_classes=1000, pretrained=True)
    with pytest.raises(ModelError, match="no hub weights"):
        create_model("A", pretrained=True)


def test_unknown_model_name():
    with pytest.raises(ModelError, match="unknown model"):
        create_model("resnet9000")
    with pytest.raises(ModelError, match="unknown timm model"):
        create_model("timm:not_a_model")


def test_load_model_for_a_dataset(tmp_path):
    """One loader for every stage: run dir, checkpoint or name, "binarized:", checked
    against any object with num_classes and geometry.shape, on the device, in eval mode."""
    from types import SimpleNamespace

    from enspipe.models.binarize import Binarized
    from enspipe.util.errors import ConfigError
    from enspipe.models import EnsModel, load_model_for

    def data(num_classes: int, shape: tuple[int, int, int]) -> SimpleNamespace:
        return SimpleNamespace(num_classes=num_classes, geometry=SimpleNamespace(shape=shape))

    digits = data(10, (1, 28, 28))
    saved = create_model("D")
    save_model(saved, tmp_path / "run")
    for spec in (tmp_path / "run", str(tmp_path / "run" / "model.json")):
        m = load_model_for(spec, digits, "cpu")
        assert isinstance(m, EnsModel) and not m.training and weights_sha256(m) == weights_sha256(saved)
    b = load_model_for(f"binarized:{tmp_path / 'run'}", digits, torch.device("cpu"))
    assert isinstance(b, Binarized) and not b.training and not b.model.training
    assert weights_sha256(b.model) == weights_sha256(saved)
    fresh = load_model_for("A", data(3, (1, 16, 16)), "cpu")  # a name is built for the data
    assert fresh.config.num_classes == 3 and fresh.config.input_size == (1, 16, 16)
    m = load_model_for("D", digits, "cpu", weights=tmp_path / "run" / "model.safetensors")
    assert weights_sha256(m) == weights_sha256(saved)
    with pytest.raises(ConfigError, match="takes"):
        load_model_for(tmp_path / "run", data(10, (1, 16, 16)), "cpu")
    with pytest.raises(ConfigError, match="predicts 10 classes but the data has 3"):
        load_model_for(f"binarized:{tmp_path / 'run'}", data(3, (1, 28, 28)), "cpu")
    with pytest.raises(ModelError):
        load_model_for(tmp_path / "nowhere", digits, "cpu")
