"""Weights registry: hash before deserialising, safe formats only, clear refusals (BAD_INPUTS 28-31)."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil

import pytest
import torch

from napari_wscovid.models import registry
from napari_wscovid.models.registry import (
    ModelLoadError,
    available_models,
    file_sha256,
    load_model,
    model_info,
    save_model,
    select_device,
)
from napari_wscovid.models.wsnet import TASK_CLASSES, WSNet, tiny_config


@pytest.fixture(autouse=True)
def _fresh_cache():
    registry.clear_cache()
    yield
    registry.clear_cache()


@pytest.fixture
def tmp_registry(tmp_path, monkeypatch):
    """A copy of the bundled registry and tiny weights that a test may damage."""
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(registry.REGISTRY_FILE, folder / "registry.json")
    shutil.copy(registry.WEIGHTS_DIR / "tiny-test.safetensors", folder / "tiny-test.safetensors")
    monkeypatch.setattr(registry, "WEIGHTS_DIR", folder)
    monkeypatch.setattr(registry, "REGISTRY_FILE", folder / "registry.json")
    return folder


def _forbid_deserialising(monkeypatch):
    import safetensors
    import safetensors.torch

    def boom(*args, **kwargs):
        raise AssertionError("the file was deserialised before its hash was checked")

    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    monkeypatch.setattr(safetensors, "safe_open", boom)
    monkeypatch.setattr(torch, "load", boom)


def test_tiny_test_is_registered_and_pinned():
    assert "tiny-test" in available_models()
    info = model_info("tiny-test")
    assert {
        "file",
        "sha256",
        "architecture",
        "classes",
        "input_size",
        "normalisation",
        "training_data",
    } <= set(info)
    assert info["available"] and file_sha256(info["path"]) == info["sha256"]
    assert pathlib.Path(info["path"]).stat().st_size < 64_000


def test_load_tiny_test_gives_eval_float32_model_and_info():
    model, info = load_model("tiny-test", device="cpu")
    assert isinstance(model, WSNet) and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert info["classes"] == list(TASK_CLASSES["3class"]) and info["input_size"] == 64
    assert info["sha256_verified"] and info["fallback"] is None and info["device"] == "cpu"
    assert info["normalisation"]["method"] in ("window", "sliding")
    out = model(torch.rand(2, 1, 64, 64))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.logits).all()


def test_hash_mismatch_refused_before_deserialising(tmp_registry, monkeypatch):
    path = tmp_registry / "tiny-test.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit in the tensor data: the header still parses
    path.write_bytes(bytes(data))
    _forbid_deserialising(monkeypatch)
    with pytest.raises(ModelLoadError, match="SHA-256 mismatch"):
        load_model("tiny-test")


def test_truncated_file_refused(tmp_path, monkeypatch):
    source = registry.WEIGHTS_DIR / "tiny-test.safetensors"
    sha = model_info("tiny-test")["sha256"]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(source.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(cut)  # no hash given: safetensors notices the short file
    _forbid_deserialising(monkeypatch)
    with pytest.raises(ModelLoadError, match="SHA-256 mismatch"):
        load_model(cut, sha256=sha)


class _Payload:
    """Pickles to a call that creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_malicious_pickle_is_not_executed_nor_retried(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _Payload(marker)}, evil)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(ModelLoadError, match="weights_only") as err:
        load_model(evil)
    assert not marker.exists()
    assert calls == [True]
    assert "evil.pt" in str(err.value)


def test_wrong_class_count_names_both(tmp_path):
    two = WSNet(tiny_config(classes=TASK_CLASSES["np_vs_covid"]))
    path = tmp_path / "binary.safetensors"
    save_model(two, path, name="binary", version="0")
    with pytest.raises(ModelLoadError) as err:
        load_model(path, expected_classes=TASK_CLASSES["3class"])
    message = str(err.value)
    assert "2 classes" in message and "3 classes" in message


def test_state_dict_for_other_class_count_than_config_names_both(tmp_path):
    """Metadata says 3 classes, tensors hold 2: a shape mismatch naming both."""
    two = WSNet(tiny_config(classes=TASK_CLASSES["np_vs_covid"]))
    meta = {"config": json.dumps(tiny_config().to_dict())}
    path = tmp_path / "mixed.safetensors"
    path.write_bytes(registry._safetensors_bytes(dict(two.state_dict()), meta))
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert "2 classes" in str(err.value) and "3 classes" in str(err.value)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    with pytest.raises(ModelLoadError, match="wsnet-hu2020"):
        load_model(path)


def test_unknown_architecture_in_metadata_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "future.pt"
    config = {**tiny_config().to_dict(), "architecture": "future-net"}
    torch.save({"model": WSNet(tiny_config()).state_dict(), "model_config": config}, path)
    with pytest.raises(ModelLoadError, match=r"future\.pt: unknown architecture 'future-net'"):
        load_model(path)


def test_plain_state_dict_pt_loads_with_inferred_config(tmp_path):
    model = WSNet(tiny_config()).eval()
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    loaded, info = load_model(path, expected_classes=None)
    assert info["input_size"] == 224  # not recorded in a bare state dict: the default
    x = torch.rand(1, 1, 64, 64)
    assert torch.allclose(loaded(x).logits, model(x).logits)


def test_nan_weights_refused(tmp_path):
    model = WSNet(tiny_config())
    state = model.state_dict()
    state["heads.conv5.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save({"state_dict": state, "config": tiny_config().to_dict()}, path)
    with pytest.raises(ModelLoadError, match="NaN"):
        load_model(path)


def test_user_file_with_sha256_verified_and_without_it_logged(tmp_path, caplog):
    model = WSNet(tiny_config()).eval()
    path = tmp_path / "mine.safetensors"
    sha = save_model(
        model, path, name="mine", version="7", extra_metadata={"normalisation": {"method": "sliding"}}
    )
    assert sha == file_sha256(path)
    loaded, info = load_model(path, sha256=sha, cache=False)
    assert info["sha256_verified"] and info["name"] == "mine" and info["version"] == "7"
    assert info["normalisation"] == {"method": "sliding"}
    x = torch.rand(1, 1, 64, 64)
    assert torch.allclose(loaded(x).logits, model(x).logits, atol=2e-2)  # float16 storage
    with caplog.at_level(logging.WARNING, logger="napari_wscovid.models.registry"):
        _, info = load_model(path, cache=False)
    assert not info["sha256_verified"]
    assert "unverified" in caplog.text and sha in caplog.text


def test_save_model_is_reproducible_and_exact_without_half(tmp_path):
    torch.manual_seed(3)
    model = WSNet(tiny_config()).eval()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert save_model(model, a, name="m", version="1", half=False) == save_model(
        model, b, name="m", version="1", half=False
    )
    loaded, _ = load_model(a)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(FileExistsError):
        save_model(model, a, name="m", version="1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cuda_request_falls_back_to_cpu_and_says_so(caplog):
    device, message = select_device("cuda")
    assert device.type == "cpu" and "CUDA is not available" in message
    with caplog.at_level(logging.WARNING):
        model, info = load_model("tiny-test", device="cuda")
    assert next(model.parameters()).device.type == "cpu"
    assert info["fallback"] and "running on CPU" in info["fallback"]
    assert "running on CPU" in caplog.text
    assert select_device("cpu") == (torch.device("cpu"), "")
    with pytest.raises(ValueError):
        select_device("tpu")


def test_cache_returns_same_object():
    first, _ = load_model("tiny-test", device="cpu")
    second, _ = load_model("tiny-test", device="cpu")
    fresh, _ = load_model("tiny-test", device="cpu", cache=False)
    assert first is second and fresh is not first


def test_unknown_name_and_missing_default_are_clear():
    with pytest.raises(ModelLoadError, match="unknown model 'nope'"):
        load_model("nope")
    if "wsnet-3class" not in available_models():
        with pytest.raises(ModelLoadError, match="wsnet-3class.safetensors"):
            load_model("default")


@pytest.mark.parametrize("name", available_models())
def test_every_bundled_model_loads_verified_and_matches_its_entry(name):
    """Each shipped weights file: hash verified, and the registry says what the file holds."""
    entry = model_info(name)
    net, info = load_model(name, device="cpu", cache=False)
    assert info["sha256_verified"] and info["sha256"] == entry["sha256"]
    assert info["architecture"] == entry["architecture"] == net.config.architecture
    assert tuple(net.config.classes) == tuple(entry["classes"])
    assert entry["training_data"] and entry["version"]
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("damage", ["bit_flip", "truncated", "header_lies_about_size", "other_dtype"])
def test_damaged_weights_are_refused_by_name_before_use(tmp_path, damage):
    """A user's file given without a SHA-256: the tensors' own checksum (written by save_model)
    catches a flipped bit; safetensors' header checks catch the rest."""
    import json as _json
    import struct

    from napari_wscovid.models.registry import ModelLoadError, clear_cache, load_model, save_model
    from napari_wscovid.models.wsnet import WSNet, tiny_config

    path = tmp_path / "mine.safetensors"
    save_model(WSNet(tiny_config(input_size=48)), path, name="mine", version="1")
    data = bytearray(path.read_bytes())
    size = struct.unpack("<Q", bytes(data[:8]))[0]
    header = _json.loads(bytes(data[8 : 8 + size]))
    first = sorted(k for k in header if k != "__metadata__")[0]
    if damage == "bit_flip":
        data[8 + size + 5] ^= 0x01
    elif damage == "truncated":
        data = data[: len(data) - 64]
    else:
        entry = header[first]
        if damage == "header_lies_about_size":
            entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 4096]
        else:
            entry["dtype"] = "I8"
        text = _json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        data = bytearray(struct.pack("<Q", len(text)) + text + bytes(data[8 + size :]))
    path.write_bytes(bytes(data))
    clear_cache()
    with pytest.raises(ModelLoadError, match="mine.safetensors"):
        load_model(path, device="cpu", cache=False)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"widths": [4, 8, 8, 16, 2_000_000]}, "widths (4, 8, 8, 16, 2000000) is not made of whole numbers"),
        ({"depths": [1, 1, 1, 1, 100_000]}, "depths (1, 1, 1, 1, 100000) is not made of whole numbers 1..64"),
        ({"classes": 5}, "classes 5 is not a list"),
        ({"input_size": "x"}, "input_size 'x'"),
        ({"widths": [4, 8, 8, 16]}, "config does not describe a wsnet-hu2020 network"),
    ],
)
def test_a_config_that_lies_about_the_network_is_refused_by_name(tmp_path, monkeypatch, change, reason):
    """Found by fuzzing: a config asking for 100,000 layers took 26 s and 2.5 GB before the shape
    check; one of the wrong type escaped as a TypeError. Out-of-range configs are refused before any
    network is built."""
    import struct

    path = tmp_path / "lying.safetensors"
    save_model(WSNet(tiny_config(input_size=32)), path, name="lying", version="1")
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    config = {**json.loads(header["__metadata__"]["config"]), **change}
    header["__metadata__"]["config"] = json.dumps(config)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])
    if "whole numbers" in reason:

        def never(self, *args, **kwargs):
            raise AssertionError("a network was built from a config out of bounds")

        monkeypatch.setattr(WSNet, "__init__", never)
    with pytest.raises(ModelLoadError, match="lying.safetensors") as info:
        load_model(path, device="cpu", cache=False)
    assert reason in str(info.value)


def test_fuzzed_normalisation_that_is_not_json_is_refused_by_name():
    """Found by fuzzing (tests/data/fuzz_regressions): metadata normalisation '{indow...' escaped
    load_model as a JSONDecodeError."""
    path = pathlib.Path(__file__).parent / "data" / "fuzz_regressions" / "normalisation_not_json.safetensors"
    with pytest.raises(ModelLoadError, match="normalisation_not_json.safetensors: normalisation '{indow"):
        load_model(path, device="cpu", cache=False)


@pytest.mark.parametrize(
    "normalisation",
    ['{"method": "window", "window": ["a", 1]}', '{"method": "window", "window": [100, -100]}', "histogram"],
)
def test_a_normalisation_the_plugin_cannot_apply_is_refused_at_load(tmp_path, normalisation):
    path = tmp_path / "norm.safetensors"
    save_model(
        WSNet(tiny_config(input_size=32)), path, name="n", version="1",
        extra_metadata={"normalisation": normalisation},
    )  # fmt: skip
    with pytest.raises(ModelLoadError, match="norm.safetensors: normalisation"):
        load_model(path, device="cpu", cache=False)


def test_a_bare_two_class_state_dict_is_refused_not_given_made_up_class_names(tmp_path):
    """It loaded as "class0"/"class1" and the dock showed "Done: class0" (case 30); three classes
    are the paper's, two could be any binary task."""
    model = WSNet(tiny_config(classes=("NP", "COVID-19"))).eval()
    path = tmp_path / "two.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelLoadError, match=r"2-class network but names no classes.*np_vs_covid"):
        load_model(path)
    three = tmp_path / "three.pth"
    torch.save(WSNet(tiny_config()).eval().state_dict(), three)
    assert load_model(three)[1]["classes"] == ["NP", "CAP", "COVID-19"]


def test_a_registered_file_chosen_by_its_path_is_checked_against_its_entry(tmp_path, monkeypatch):
    """ "Choose file…" on a registered file whose bytes changed loaded it, logging only "hash
    unverified" (case 29); picked by name it was refused."""
    entry = registry.model_info("tiny-test")
    copy = tmp_path / pathlib.Path(entry["path"]).name
    shutil.copy(entry["path"], copy)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    copy.write_bytes(bytes(data))
    original = registry.model_info

    def moved(name):  # the registry's file is the changed copy
        info = dict(original(name))
        if info["name"] == "tiny-test":
            info["path"] = str(copy)
        return info

    monkeypatch.setattr(registry, "model_info", moved)
    with pytest.raises(ModelLoadError, match="SHA-256 mismatch"):
        load_model(str(copy), cache=False)
