"""`verify --recompute`: recompute a few samples of a store with its static model and compare."""
from __future__ import annotations

import os

import numpy as np

from enspipe.attack_records import record
from enspipe.util.errors import ConfigError, StoreError

from enspipe.precision import Precision

from .compute import _deterministic, batch_containing
from enspipe.data.loader import batch_to_device, encoded_chunk
from .plan import store_precision

__all__ = ["recompute_check"]


def recompute_check(store: str | os.PathLike, *, k: int, model: str | None = None, data_root: str | None = None,
                    device: str = "auto", seed: int | None = None) -> list[str]:
    """Recompute k random samples' directions with the static model and compare with the store.

    The model is the one recorded in the manifest's `extra` unless `model` is given. Each
    sample is first recomputed in one small batch; a sample that differs is recomputed again
    inside its original batch (same boundaries as precompute), which must match bit for bit,
    since a different batch size may legitimately flip the sign of a near-zero gradient.
    The store's precision (fp32 or bf16) is used again. Returns problem strings (empty = sound).
    """
    import torch

    from enspipe import attacks
    from enspipe.data import create_dataset
    from enspipe.data.decode import resolve_decoder
    from enspipe.models import load_model_for, weights_sha256
    from enspipe.util.runtime import resolve_device
    from enspipe.stores import open_store

    reader = open_store(store)
    ident, extra = reader.identity, reader.manifest.get("extra", {})
    recorded, config = extra.get("model", {}), extra.get("config", {})
    spec = model or recorded.get("spec")
    if not spec:
        raise ConfigError(f"store {store} records no model; pass `model`")
    weights = None if model else recorded.get("weights")
    pretrained = False if model else bool(recorded.get("pretrained", False))
    if "dataset" not in config:
        raise StoreError(f"store {store} records no dataset configuration to recompute from")
    dataset = create_dataset(config["dataset"], split=config.get("split", ident.dataset["split"]),
                             limit=config.get("limit"), data_root=data_root or config.get("data_root"),
                             image_size=config.get("image_size"))
    if dataset.fingerprint != ident.dataset["fingerprint"]:
        from enspipe.stores.base import data_difference

        return [f"the dataset {config['dataset']} found now is not the store's: "
                f"{data_difference(ident.dataset, dataset, reader.manifest.get('created_at'))}"]
    dev = resolve_device(device)
    precision = Precision.resolve(store_precision(ident), dev, strict=True)
    # A store made by the device decoder is recomputed from that decoder's pixels (nvjpeg: on CUDA only).
    decoder = str(ident.attack_params.get("decoder", "cpu"))
    try:
        resolve_decoder(decoder, dev)
    except ConfigError:
        raise StoreError(f"store {store} was decoded by {decoder}: recompute it on a CUDA device (`device` cuda)"
                         ) from None
    net = load_model_for(spec, dataset, dev, weights=weights,
                         pretrained=pretrained).requires_grad_(False)
    precision.prepare_model(net)
    if weights_sha256(net) != ident.weights_sha256:
        return [f"model {spec} has other weights (sha256 {weights_sha256(net)[:12]}..) than the store's "
                f"({ident.weights_sha256[:12]}..)"]
    label = config.get("label", "pred") if record(ident.attack).label == "given" else "pred"
    batch_size = int(config.get("batch_size", 256))

    n = len(dataset)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))
    stored = reader.read_indices(idx)
    stored_keys = [reader.keys(int(i), int(i) + 1)[0] for i in idx]

    def run(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if decoder == "cpu":
            x = dataset.images(indices).to(dev)
        else:
            x = batch_to_device([encoded_chunk(dataset, (int(i) for i in indices))], dev, dataset)
        x = precision.memory_format(x)
        y = torch.from_numpy(dataset.labels[indices]).to(dev) if label == "true" else None
        d, logits, labels = attacks.direction(net, x, y, attack=ident.attack, label=label,
                                              autocast=precision.autocast_dtype)
        return d.cpu().numpy(), logits.float().cpu().numpy().astype(np.float16), labels.cpu().numpy()

    def matches(row: int, d: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> bool:
        return (np.array_equal(d, stored["direction"][row]) and int(labels) == int(stored["label"][row])
                and np.array_equal(logits, stored["logits"][row], equal_nan=True))

    problems: list[str] = []
    batches: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    with _deterministic():
        quick = run(idx)
        for row, i in enumerate(idx.tolist()):
            if stored_keys[row] != dataset.keys[i]:
                problems.append(f"sample {i}: stored key {stored_keys[row]!r} is not the dataset's {dataset.keys[i]!r}")
                continue
            if matches(row, quick[0][row], quick[1][row], quick[2][row]):
                continue
            b, e = batch_containing(i, shard_size=reader.shard_size, batch_size=batch_size, num_samples=n)
            if (b, e) not in batches:  # several suspects may share a batch: compute it once
                batches[b, e] = run(np.arange(b, e))
            d, logits, labels = (a[i - b] for a in batches[b, e])
            if matches(row, d, logits, labels):
                continue
            diff = int((d != stored["direction"][row]).sum())
            problems.append(f"sample {i} ({dataset.keys[i]}): recomputed direction differs in {diff} of "
                            f"{d.size} elements, label {int(labels)} vs stored {int(stored['label'][row])}")
    return problems
