"""Named, pinned network weights: which file, its SHA-256, and what the network expects.

The table lives in ``models/weights/registry.json``; each entry gives ``file`` (relative to
that folder), ``sha256``, ``architecture``, ``classes``, ``input_size``, ``normalisation``,
``training_data`` and ``version``. A user may instead pass the path of their own file.

Loading order (BAD_INPUTS cases 28-31):

1. the file's SHA-256 is computed and compared *before* anything deserialises it;
2. ``.safetensors`` is read with ``safetensors.torch.load_file`` (no code can run);
   ``.pt``/``.pth``/``.ckpt`` only with ``torch.load(..., weights_only=True)``, and a file
   refused by it is never retried with ``weights_only=False``;
3. the state dict is checked against the configuration (keys, shapes, class count) and for
   NaN/inf, and every failure is a :class:`ModelLoadError` that names both sides.

``"default"`` is an alias for the best registered model, ``"wsnet-3class"`` (the bundled
trained network). It never falls back to the ``"tiny-test"`` network, whose random weights
only exist for tests: when the trained file is missing, loading ``"default"`` raises an
error naming the missing file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from napari_wscovid.architectures import DECOVNET, FECNN, WSNET
from napari_wscovid.models.wsnet import TASK_CLASSES, WSNetConfig

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REGISTRY_FILE = WEIGHTS_DIR / "registry.json"
ALIASES = {"default": "wsnet-3class"}
FORMAT = "napari-wscovid/1"
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt")

# Every network the registry can rebuild: architecture name -> (module, config class, model class).
# Each config class has ``classes``, ``architecture``, ``to_dict`` and ``from_dict``; imports are
# lazy so that loading one network never imports the others.
ARCHITECTURES = {
    WSNET: ("napari_wscovid.models.wsnet", "WSNetConfig", "WSNet"),
    DECOVNET: ("napari_wscovid.models.decovnet", "DeCoVNetConfig", "DeCoVNet"),
    FECNN: ("napari_wscovid.models.fecnn", "FeCNNConfig", "FeCNN"),
}

_cache: dict[tuple[str, str, str], tuple[torch.nn.Module, dict]] = {}
_cache_lock = threading.Lock()


class ModelLoadError(RuntimeError):
    """Weights that cannot be used; the message names the file and the reason."""


def _registry() -> dict[str, dict]:
    with open(REGISTRY_FILE, encoding="utf-8") as handle:
        return json.load(handle)["models"]


def _resolve_name(name: str) -> str:
    return ALIASES.get(name, name)


def available_models() -> list[str]:
    """Registered model names whose weights file is present (aliases not included)."""
    return sorted(n for n, e in _registry().items() if (WEIGHTS_DIR / e["file"]).is_file())


def model_info(name: str) -> dict:
    """The registry entry of ``name`` (or an alias), with ``name``, ``path`` and ``available``."""
    registry = _registry()
    resolved = _resolve_name(name)
    if resolved not in registry:
        raise KeyError(f"no registered model {name!r}; registered: {sorted(registry)}, aliases: {ALIASES}")
    entry = dict(registry[resolved])
    path = WEIGHTS_DIR / entry["file"]
    entry.update(name=resolved, path=str(path), available=path.is_file())
    return entry


def select_device(requested: str = "auto") -> tuple[torch.device, str]:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> (device, message).

    The message is empty unless a requested GPU is unavailable and CPU is used instead;
    callers show it (the fallback is never silent).
    """
    text = str(requested).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), ""
    if text == "cpu":
        return torch.device("cpu"), ""
    if text == "cuda" or text.startswith("cuda:"):
        index = int(text.split(":", 1)[1]) if ":" in text else 0
        if not torch.cuda.is_available():
            return torch.device("cpu"), (
                f"device {requested!r} was requested but CUDA is not available "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False); running on CPU"
            )
        if index >= torch.cuda.device_count():
            return torch.device("cpu"), (
                f"device {requested!r} was requested but only {torch.cuda.device_count()} "
                "CUDA device(s) exist; running on CPU"
            )
        return torch.device(f"cuda:{index}"), ""
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {requested!r}")


def file_sha256(path) -> str:
    """SHA-256 of a file, read in chunks (never deserialised)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def clear_cache() -> None:
    """Forget every loaded model (e.g. after replacing a weights file in tests)."""
    with _cache_lock:
        _cache.clear()


def _meta_number(meta: Mapping, key: str, default: float) -> tuple[float, object]:
    """A number stored as text in the weights' metadata (``default`` when absent, NaN when not a
    number), and the raw text for the error message."""
    raw = meta.get(key)
    if raw is None:
        return default, raw
    try:
        return float(raw), raw
    except ValueError:
        return float("nan"), raw


def _temperature(meta: Mapping, path: Path) -> float:
    """The calibration temperature stored with the weights (1 when there is none)."""
    value, raw = _meta_number(meta, "temperature", 1.0)
    if not (math.isfinite(value) and value > 0):
        raise ModelLoadError(f"{path.name}: calibration temperature {raw!r} is not a positive number")
    return value


def _np_offset(meta: Mapping, path: Path, key: str) -> float:
    """An NP log-odds offset stored with the weights (``patient_np_offset``, ``slice_np_offset``;
    0 when there is none)."""
    value, raw = _meta_number(meta, key, 0.0)
    # |offset| <= 20 (odds times 5e8): anything larger is a corrupt field, not a calibration
    if not (math.isfinite(value) and abs(value) <= 20.0):
        what = key.replace("_np_offset", "")
        raise ModelLoadError(f"{path.name}: {what} NP offset {raw!r} is not a number in [-20, 20]")
    return value


def _normalisation(entry: Mapping | None, meta: Mapping, path: Path):
    """The intensity normalisation stored with the weights (a name, or a dict as JSON), checked
    now: a bad one found at load names the file, one found at detection would not (fuzzing)."""
    from napari_wscovid.preprocess import normalisation_spec

    raw = meta.get("normalisation") or (entry or {}).get("normalisation")
    value = raw
    try:
        if isinstance(raw, str) and raw.startswith("{"):
            value = json.loads(raw)
        spec = normalisation_spec(value)
        numbers = spec["window"] if spec["method"] == "window" else [spec["q"], spec["s"]]
        usable = all(math.isfinite(v) for v in numbers)
        if spec["method"] == "window":
            usable = usable and len(numbers) == 2 and numbers[0] < numbers[1]
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        usable = False
    if not usable:
        raise ModelLoadError(f"{path.name}: normalisation {str(raw)[:80]!r} is not one this plugin can apply")
    return value


def _review_below(entry: Mapping | None, meta: Mapping, path: Path) -> float | None:
    """The top patient probability under which this model's answer needs review (chosen on
    held-out patients; ``None`` when nobody chose one)."""
    raw = (entry or {}).get("review_below", meta.get("review_below"))
    if raw in (None, ""):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise ModelLoadError(f"{path.name}: review_below {raw!r} is not a probability between 0 and 1")
    return value


def load_model(
    name_or_path,
    *,
    device: str = "auto",
    sha256: str | None = None,
    expected_classes: Sequence[str] | None = None,
    cache: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Load a registered model (by name or alias) or a user's weights file, in eval mode.

    Parameters
    ----------
    name_or_path : str or path
        A name from :func:`available_models`, ``"default"``, or a ``.safetensors`` /
        ``.pt`` / ``.pth`` file.
    device : {"auto", "cpu", "cuda", "cuda:N"}
        A GPU that is unavailable falls back to CPU and ``info["fallback"]`` says so.
    sha256 : str, optional
        Expected hash of a user's file; registered models are always checked against the
        registry. Without it a user's file loads with a warning giving its computed hash.
    expected_classes : sequence of str, optional
        Refuse a network whose classes differ.
    cache : bool
        Reuse the model loaded earlier from the same (path, hash, device). The cached object
        is shared: do not train or modify it.

    Returns
    -------
    model : torch.nn.Module
        The network (WSNet, DeCoVNet or FeCNN, by the file's architecture).
    info : dict
        ``name, version, sha256, device, classes, input_size, normalisation, architecture,
        path, fallback`` (``fallback`` is None unless the device fell back to CPU).

    Raises
    ------
    ModelLoadError
        Unknown name, missing or truncated file, hash mismatch, refused pickle, wrong
        architecture or class count, NaN/inf weights.
    """
    entry, path = _locate(name_or_path)
    torch_device, fallback = select_device(device)
    if fallback:
        logger.warning("%s", fallback)

    expected = (entry or {}).get("sha256")
    if entry is not None and not expected:
        raise ModelLoadError(f"registry entry {entry['name']!r} has no sha256; refusing to load {path.name}")
    if sha256 and expected and sha256.lower() != expected.lower():
        raise ModelLoadError(
            f"sha256 argument {sha256} differs from the registry's {expected} for {entry['name']!r}"
        )
    expected = (expected or sha256 or "").lower() or None
    actual = file_sha256(path)  # before anything parses the file (case 29)
    if expected and actual != expected:
        raise ModelLoadError(
            f"{path.name}: SHA-256 mismatch (expected {expected}, file has {actual}); the file is "
            "corrupt, truncated or not the one registered. Not loaded."
        )
    if not expected:
        logger.warning("%s: hash unverified (no sha256 given); its SHA-256 is %s", path.name, actual)

    key = (str(path), actual, str(torch_device))
    if cache:
        with _cache_lock:
            if key in _cache:
                model, info = _cache[key]
                return model, {**info, "fallback": fallback or None}

    state, meta = _read_weights(path)
    config = _config_from(meta, state, entry, path)
    _check_compatible(config, state, entry, expected_classes, path)
    _, model_cls = architecture_classes(config.architecture)
    model = model_cls(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shapes or keys that the checks above did not foresee
        raise ModelLoadError(
            f"{path.name} does not fit {_describe(config)}: {str(exc).splitlines()[0]}"
        ) from exc
    model = model.float().to(torch_device).eval()

    normalisation = _normalisation(entry, meta, path)
    info = {
        "temperature": _temperature(meta, path),
        "patient_np_offset": _np_offset(meta, path, "patient_np_offset"),
        "slice_np_offset": _np_offset(meta, path, "slice_np_offset"),
        "name": (entry or {}).get("name") or meta.get("name") or path.stem,
        "version": (entry or {}).get("version") or meta.get("version") or "unknown",
        "sha256": actual,
        "sha256_verified": bool(expected),
        "device": str(torch_device),
        "classes": list(config.classes),
        "input_size": getattr(config, "input_size", None),
        "architecture": config.architecture,
        "normalisation": normalisation,
        "training_data": (entry or {}).get("training_data") or meta.get("training_data", ""),
        "path": str(path),
        "fallback": fallback or None,
        "review_below": _review_below(entry, meta, path),
    }
    if cache:
        with _cache_lock:
            _cache[key] = (model, info)
    return model, dict(info)


def _locate(name_or_path) -> tuple[dict | None, Path]:
    """(registry entry or None, weights path), with a clear error for the missing ones."""
    if isinstance(name_or_path, str) and "/" not in name_or_path and "\\" not in name_or_path:
        registry = _registry()
        resolved = _resolve_name(name_or_path)
        if resolved in registry:
            entry = model_info(resolved)
            path = Path(entry["path"])
            if not path.is_file():
                alias = f" ({name_or_path!r} is an alias for it)" if resolved != name_or_path else ""
                raise ModelLoadError(
                    f"weights for model {resolved!r}{alias} are not installed: {path} is missing. "
                    f"Available models: {available_models()}; or pass the path of a weights file."
                )
            return entry, path
        if not Path(name_or_path).suffix:
            raise ModelLoadError(
                f"unknown model {name_or_path!r}; available: {available_models()}, aliases: {sorted(ALIASES)}"
            )
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"weights file {path.name} is empty")
    # a registered file chosen by its path ("Choose file…") is checked against its entry too
    for name in _registry():
        entry = model_info(name)
        if Path(entry["path"]).resolve() == path.resolve():
            return entry, path
    return None, path


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict (float32 on CPU) and string metadata; nothing here can execute code."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        import safetensors
        import safetensors.torch

        try:
            with safetensors.safe_open(str(path), framework="pt") as handle:
                meta = dict(handle.metadata() or {})
            _check_tensor_digest(path, meta)
            state = safetensors.torch.load_file(str(path), device="cpu")
        except ModelLoadError:
            raise
        except Exception as exc:  # SafetensorError, OSError: truncated or not safetensors
            raise ModelLoadError(
                f"{path.name} is not a readable safetensors file (truncated?): {exc}"
            ) from exc
    elif suffix in _PICKLE_SUFFIXES:
        try:
            # weights_only=True is passed explicitly; a refusal is final (case 28).
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(
                f"{path.name} was refused by torch.load(weights_only=True): it holds more than "
                "tensors (possibly code) or is corrupt. It will not be loaded with "
                f"weights_only=False; convert it to safetensors. ({type(exc).__name__})"
            ) from exc
        state, meta = _split_checkpoint(obj, path)
    else:
        raise ModelLoadError(f"{path.name}: unsupported weights format {suffix!r} (use .safetensors or .pt)")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelLoadError(f"{path.name}: entry {key!r} is not a tensor")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelLoadError(f"{path.name}: weights contain NaN or inf (in {key!r}); refusing to load")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return state, meta


TENSOR_DIGEST_KEY = "tensors_sha256"


def _check_tensor_digest(path: Path, meta: Mapping) -> None:
    """Compare the tensor bytes with the checksum ``save_model`` wrote (files without one pass)."""
    expected = meta.get(TENSOR_DIGEST_KEY)
    if not expected:
        return
    with open(path, "rb") as fh:
        header_size = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + header_size)
        digest = hashlib.sha256()
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ModelLoadError(
            f"{path.name} is corrupt: its tensors do not match the checksum written with them "
            "(a damaged download or disk); refusing to load"
        )


def _split_checkpoint(obj, path: Path) -> tuple[dict, dict]:
    """A torch checkpoint (bare state dict, or a dict holding one plus a config)."""
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"{path.name} holds a {type(obj).__name__}, not a state dict")
    meta: dict = {}
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj.get(key), Mapping):
            config = obj.get("config") or obj.get("model_config")
            if isinstance(config, Mapping):
                meta["config"] = json.dumps(dict(config.get("model", config)))
            for field in ("name", "version", "normalisation"):
                if isinstance(obj.get(field), str):
                    meta[field] = obj[field]
            return dict(obj[key]), meta
    return dict(obj), meta


def architecture_classes(architecture: str) -> tuple[type, type]:
    """(config class, model class) of a registered architecture name."""
    if architecture not in ARCHITECTURES:
        raise ModelLoadError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    module, config_name, model_name = ARCHITECTURES[architecture]
    mod = importlib.import_module(module)
    return getattr(mod, config_name), getattr(mod, model_name)


def _config_from(meta: dict, state: dict, entry: dict | None, path: Path):
    if meta.get("config"):
        try:
            data = json.loads(meta["config"])
            architecture = data.get("architecture") or meta.get("architecture") or WSNetConfig.architecture
            config_cls, _ = architecture_classes(architecture)
            config = config_cls.from_dict(data)
        except ModelLoadError as exc:  # an architecture this plugin does not know
            raise ModelLoadError(f"{path.name}: {exc}") from exc
        except (ValueError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{path.name}: unreadable config in metadata: {exc}") from exc
    else:
        config = _infer_config(state, entry, path)
    _check_config(config, path)
    return config


# Bounds on a config read from a file: far above every network here (widths up to 512, depths up to
# 4, inputs up to 512), low enough that a config lying about the network cannot make building it
# take gigabytes or minutes (fuzzing: depth 100,000 took 26 s and 2.5 GB before any check ran).
_MAX_CONFIG_INT = 4096
_MAX_DEPTH = 64
_MAX_CLASSES = 64


def _check_config(config, path: Path) -> None:
    """Refuse a config whose fields are not what its architecture's dataclass declares."""
    problems = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "architecture":
            continue
        if field.name == "classes":
            names = isinstance(value, tuple) and all(isinstance(c, str) for c in value)
            if not (names and 0 < len(value) <= _MAX_CLASSES):
                problems.append(f"classes {value!r} is not a list of 1 to {_MAX_CLASSES} class names")
        elif field.name == "dropout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                problems.append(f"dropout {value!r} is not a probability below 1")
        else:
            limit = _MAX_DEPTH if field.name == "depths" else _MAX_CONFIG_INT
            items = value if isinstance(value, tuple) else (value,)
            whole = all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit for v in items)
            if not (items and whole):
                problems.append(f"{field.name} {value!r} is not made of whole numbers 1..{limit}")
    if problems:
        raise ModelLoadError(f"{path.name}: invalid config in metadata: {'; '.join(problems)}")


def _infer_config(state: dict, entry: dict | None, path: Path) -> WSNetConfig:
    """Rebuild a WSNet config from tensor shapes (checkpoints saved without one)."""
    widths, depths = [], []
    for block in range(5):
        convs = sorted(
            k
            for k, v in state.items()
            if k.startswith(f"blocks.{block}.") and k.endswith("weight") and v.ndim == 4
        )
        if not convs:
            raise ModelLoadError(
                f"{path.name} has no config and does not look like a WSNet (no 'blocks.{block}.*' "
                f"convolutions; first keys: {list(state)[:3]}); expected architecture wsnet-hu2020"
            )
        widths.append(int(state[convs[0]].shape[0]))
        depths.append(len(convs))
    head = state.get("heads.conv3.weight")
    if head is None:
        raise ModelLoadError(f"{path.name} has no 'heads.conv3.weight'; not a wsnet-hu2020 checkpoint")
    n_classes = int(head.shape[0])
    if entry and len(entry.get("classes", ())) == n_classes:
        classes = tuple(entry["classes"])
    elif n_classes == len(TASK_CLASSES["3class"]):
        classes = TASK_CLASSES["3class"]  # the paper's three classes: the only 3-class task
    else:
        # "class0", "class1" made up here gave a user an answer nobody could read (case 30); two
        # classes could be any of the binary tasks
        tasks = ", ".join(f"{k} {list(v)}" for k, v in TASK_CLASSES.items() if len(v) == n_classes)
        raise ModelLoadError(
            f"{path.name} holds a {n_classes}-class network but names no classes (no config in its "
            f"metadata, no registry entry){f'; it could be {tasks}' if tasks else ''}: export it "
            "with `python -m training.export_checkpoint`, which writes them"
        )
    input_size = int((entry or {}).get("input_size", 224))
    first_conv = sorted(k for k in state if k.startswith("blocks.0.") and k.endswith("weight"))[0]
    in_channels = int(state[first_conv].shape[1])
    return WSNetConfig(
        classes=classes,
        widths=tuple(widths),
        depths=tuple(depths),
        input_size=input_size,
        in_channels=in_channels,
    )


def _describe(config) -> str:
    return f"{config.architecture} with {len(config.classes)} classes {list(config.classes)}"


def _check_compatible(config, state: dict, entry: dict | None, expected_classes, path: Path) -> None:
    """Refuse a checkpoint for another architecture or class set, naming both (case 30)."""
    want_arch = (entry or {}).get("architecture", config.architecture)
    if config.architecture != want_arch:
        raise ModelLoadError(
            f"{path.name} is a {config.architecture!r} checkpoint; this plugin expects {want_arch!r}"
        )
    wanted = expected_classes if expected_classes is not None else (entry or {}).get("classes")
    if wanted is not None and tuple(wanted) != tuple(config.classes):
        raise ModelLoadError(
            f"{path.name} predicts {len(config.classes)} classes {list(config.classes)}, "
            f"but {len(tuple(wanted))} classes {list(wanted)} were expected"
        )
    _, model_cls = architecture_classes(config.architecture)
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated for a config that lies
            reference = model_cls(config).state_dict()
    except Exception as exc:  # a config its network cannot be built from (wrong number of widths...)
        raise ModelLoadError(
            f"{path.name}: config does not describe a {config.architecture} network ({exc})"
        ) from exc
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in reference.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        head = state.get("heads.conv3.weight")
        found = (
            f"{int(head.shape[0])} classes" if head is not None and head.ndim == 4 else "another architecture"
        )
        details = "; ".join(
            part
            for part in (
                f"{len(missing)} missing keys (e.g. {missing[:2]})" if missing else "",
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})" if unexpected else "",
                f"{len(wrong)} shape mismatches (e.g. {wrong[:2]})" if wrong else "",
            )
            if part
        )
        raise ModelLoadError(f"{path.name} holds weights for {found}, not {_describe(config)}: {details}")


def save_model(
    model: torch.nn.Module,
    path,
    *,
    name: str,
    version: str,
    extra_metadata: Mapping | None = None,
    half: bool = True,
    overwrite: bool = False,
) -> str:
    """Write ``model`` as safetensors with its config in the metadata; return the SHA-256.

    Floating tensors are stored as float16 when ``half`` (files half the size; the loader
    casts back to float32). The file is written atomically (temporary file, then rename);
    an existing file is replaced only with ``overwrite=True``. ``extra_metadata`` values
    that are not strings are stored as JSON (e.g. ``{"normalisation": {...}}``).
    """
    from napari_wscovid.io.atomic import atomic_write
    from napari_wscovid.preprocess import DEFAULT_NORMALISATION

    config = getattr(model, "config", None)
    if getattr(config, "architecture", None) not in ARCHITECTURES:
        raise TypeError(
            f"save_model needs a registered network (a .config whose architecture is one of "
            f"{sorted(ARCHITECTURES)}), got {type(model).__name__}"
        )
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{key} is not finite{' in float16' if half else ''}; not saving {name!r}")
        state[key] = tensor.contiguous().clone()
    meta = {
        "format": FORMAT,
        "config": json.dumps(config.to_dict()),
        "name": str(name),
        "version": str(version),
        "architecture": config.architecture,
        "classes": json.dumps(list(config.classes)),
        "normalisation": DEFAULT_NORMALISATION,
    }
    for key, value in (extra_metadata or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_model writes .safetensors files, got {path.name}")
    atomic_write(path, lambda tmp: tmp.write_bytes(_safetensors_bytes(state, meta)), overwrite=overwrite)
    return file_sha256(path)


_DTYPES = {
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}


def _safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise to the safetensors format with a sorted header.

    ``safetensors.torch.save`` orders the metadata through a hash map, so the same model gave
    a different file (and SHA-256) on every run; sorted keys make exports reproducible.
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key]
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"cannot store {key!r} of dtype {tensor.dtype}")
        array = tensor.contiguous().numpy()
        data = array.astype(
            array.dtype.newbyteorder("<"), copy=False
        ).tobytes()  # the format is little-endian
        end = offset + len(data)
        header[key] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        chunks.append(data)
        digest.update(data)
        offset += len(data)
    # the tensors' own checksum, in the header: a flipped bit in a user's file (given without a
    # SHA-256 of the whole file) is still refused before any tensor is used
    header["__metadata__"][TENSOR_DIGEST_KEY] = digest.hexdigest()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)
