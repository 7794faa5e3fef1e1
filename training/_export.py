"""Export of trained weights: the package's registry when present, a minimal stand-in otherwise.

The stand-in writes the same kind of file the registry contract describes (safetensors, float16
weights, the network config and provenance as string metadata) so that a run started before the
registry existed still produces a usable file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_model_standin(model, path, *, name, version, extra_metadata=None, half=True, overwrite=True) -> str:
    from safetensors.torch import save_file

    tensors = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    metadata = {
        "name": name,
        "version": version,
        "config": json.dumps(model.config.to_dict()),
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_metadata or {}).items()},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return sha256_file(path)


def save_model(
    model, path, *, name: str, version: str, extra_metadata: dict | None = None, half: bool = True
) -> str:
    """Write ``model`` to ``path`` as safetensors and return the file's SHA-256."""
    try:
        from napari_wscovid.models.registry import save_model as registry_save
    except ImportError:
        log.warning("napari_wscovid.models.registry not available: using the training stand-in exporter")
        registry_save = _save_model_standin
    return registry_save(
        model, path, name=name, version=version, extra_metadata=extra_metadata, half=half, overwrite=True
    )


def export_weights(model, cfg, extra_metadata: dict | None = None) -> tuple[Path, str]:
    """Export a trainer's kept network where its run options say (``--export``, else
    ``OUT/<export_name>.safetensors``) as ``export_name`` ``export_version``; return the path and
    the file's SHA-256."""
    from training.config import export_path

    path = export_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    sha = save_model(
        model, path, name=cfg.export_name, version=cfg.export_version, extra_metadata=extra_metadata
    )
    return path, sha


def load_model(path):
    """Load an exported file back into a WSNet (registry loader when present)."""
    try:
        from napari_wscovid.models.registry import load_model as registry_load
    except ImportError:
        registry_load = None
    if registry_load is not None:
        model, _ = registry_load(str(path), device="cpu", sha256=sha256_file(path), cache=False)
        return model
    from safetensors import safe_open
    from safetensors.torch import load_file

    from napari_wscovid.models.wsnet import WSNet, WSNetConfig

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    model = WSNet(WSNetConfig.from_dict(json.loads(meta["config"])))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.eval()
