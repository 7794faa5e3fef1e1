"""Temperature scaling (Guo et al. 2017): one scalar T so that softmax(logits / T) is calibrated.

Fitted on the validation set by minimising the negative log-likelihood; it leaves every slice's
arg-max unchanged but changes how confident the probabilities are, and so the patient rule's mean
over the most abnormal slices. The value travels in the weights file's metadata (``temperature``)
and the plugin divides the logits by it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

LOG_T_BOUNDS = (-3.0, 3.0)  # T in [0.05, 20]


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / temperature)."""
    logp = log_softmax(np.asarray(logits, float) / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), np.asarray(labels, int)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the validation NLL (bounded search over log T)."""
    logits, labels = np.asarray(logits, float), np.asarray(labels, int)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need (N, K) logits and N labels, got {logits.shape} and {labels.shape}")
    res = minimize_scalar(
        lambda t: nll(logits, labels, float(np.exp(t))), bounds=LOG_T_BOUNDS, method="bounded"
    )
    return float(np.exp(res.x))


def recalibrate(
    weights: str | Path, config: str | Path, out: str | Path, *, overwrite: bool = False
) -> float:
    """Fit the temperature of exported ``weights`` on the validation set of the run ``config``
    describes (rebuilt from its seeds) and write a copy with it in the metadata; return it.

    For weights exported before their trainer fitted temperatures, or after a change of the
    validation data. The copy keeps every other metadata field; an existing ``out`` is replaced
    only with ``overwrite``.
    """
    from napari_wscovid.models.registry import load_model
    from training.evaluation.heldout import load_training_config
    from training.train_classifier import DistInfo, build_data, calibrate_on

    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{Path(out).name} exists; pass overwrite=True (--overwrite) to replace it")
    cfg = load_training_config(config)
    net, _ = load_model(str(weights), device="cpu", cache=False)
    data = build_data(cfg, tuple(net.config.classes), DistInfo())
    temperature, calibration = calibrate_on(net, data.val, "cpu", cfg.eval_batch_size)
    copy_with_metadata(
        weights, out, {"temperature": temperature, "calibration": calibration}, overwrite=overwrite
    )
    return temperature


def copy_with_metadata(
    weights: str | Path,
    out: str | Path,
    updates: dict,
    *,
    version: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write a copy of the ``weights`` file with ``updates`` in its metadata; return its SHA-256.

    Every other metadata field (training data, temperature, model card fields) is kept; the tensors
    are written as loaded; ``version`` replaces the version when given. An existing ``out``, or
    feature reference beside it, is replaced only with ``overwrite``.
    """
    import safetensors

    from napari_wscovid.models.registry import load_model, save_model
    from napari_wscovid.reliability import reference_path

    carried = reference_path(out)
    if reference_path(weights).exists() and carried.exists() and not overwrite:
        raise FileExistsError(f"{carried.name} exists; pass overwrite=True (--overwrite) to replace it")
    net, info = load_model(str(weights), device="cpu", cache=False)
    with safetensors.safe_open(str(weights), framework="pt") as handle:
        meta = dict(handle.metadata() or {})
        # float16 files stay float16; a float32 file is not rounded on the way
        half = all(handle.get_slice(k).get_dtype() != "F32" for k in handle.keys())
    keep = {k: v for k, v in meta.items() if k not in ("name", "version", "config", "architecture", "format")}
    keep.update(updates)
    sha = save_model(
        net,
        out,
        name=info["name"],
        version=version or info["version"],
        extra_metadata=keep,
        half=half,
        overwrite=overwrite,
    )
    _carry_feature_reference(Path(weights), Path(out), info["sha256"], sha)
    return sha


def _carry_feature_reference(weights: Path, out: Path, old_sha: str, new_sha: str) -> None:
    """The tensors are unchanged, so the reliability check's feature reference beside ``weights``
    still describes them: write it beside ``out``, tied to the copy's SHA-256."""
    from napari_wscovid.reliability import FeatureReference, reference_path

    source = reference_path(weights)
    if not source.exists() or reference_path(out) == source:
        return
    reference = FeatureReference.load(source, old_sha)
    note = f" (carried to a metadata-only copy, SHA-256 {new_sha[:12]}...)"
    dataclasses.replace(reference, weights_sha256=new_sha, description=reference.description + note).save(
        reference_path(out)
    )


def main(argv=None) -> int:
    import argparse
    import logging

    parser = argparse.ArgumentParser(description="Fit and store the calibration temperature of weights")
    parser.add_argument("weights")
    parser.add_argument("--config", required=True, help="the training run's config.json (its validation set)")
    parser.add_argument("--out", required=True, help="where to write the calibrated copy")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    temperature = recalibrate(args.weights, args.config, args.out, overwrite=args.overwrite)
    print(f"temperature {temperature:.4f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
