"""What the harnesses share: a scratch file per process, quiet readers, the instrumented import."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

# The grid the boxes seeds were made on, and the CT given as ``expected_geometry`` when fuzzing.
BOXES_GEOMETRY = {
    "shape": [4, 10, 12],
    "spacing": [2.0, 0.7, 0.7],
    "origin": [-30.0, -12.0, -10.0],
    "direction": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
}

# A fuzzed header may legitimately ask for up to the cap; a small cap keeps a run within memory while
# still exercising the refusal (the readers' default is 4 GiB).
MAX_BYTES = 256 * 2**20

_SCRATCH = Path(tempfile.mkdtemp(prefix="wscovid-fuzz-"))


def scratch_file(name: str, data: bytes) -> Path:
    """``data`` written to one reused file called ``name`` (the readers choose by suffix)."""
    path = _SCRATCH / name
    path.write_bytes(data)
    return path


def quiet() -> None:
    """Readers log and warn about every odd input; at thousands of inputs a second that is only noise."""
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")


def names_input(exc: BaseException, *names: str) -> None:
    """A refusal must name what it refused (BAD_INPUTS): otherwise raise, so it counts as a finding."""
    text = str(exc)
    if not any(n in text for n in names):
        raise AssertionError(f"error does not name the file ({type(exc).__name__}: {text[:300]})") from exc


@contextlib.contextmanager
def instrumented(*packages: str):
    """Coverage instrumentation of ``packages`` when atheris can do it; otherwise blind fuzzing, said so."""
    import atheris

    try:
        context = atheris.instrument_imports(include=list(packages))
    except Exception as exc:  # an interpreter whose bytecode atheris cannot instrument
        print(f"atheris cannot instrument {packages} here ({exc}); fuzzing without coverage", file=sys.stderr)
        context = contextlib.nullcontext()
    with context:
        yield


def fuzz(test_one_input, custom_mutator=None) -> None:
    import atheris

    quiet()
    kwargs = {"custom_mutator": custom_mutator} if custom_mutator else {}
    atheris.Setup(sys.argv, test_one_input, **kwargs)
    atheris.Fuzz()


def replay(test_one_input, paths) -> int:
    """Run inputs through a harness without atheris (``python fuzz/fuzz_x.py --replay FILE...``)."""
    quiet()
    for path in paths:
        for file in sorted(Path(path).iterdir()) if Path(path).is_dir() else [Path(path)]:
            test_one_input(file.read_bytes())
    return 0


def main(test_one_input, custom_mutator=None) -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--replay":
        sys.exit(replay(test_one_input, sys.argv[2:]))
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    fuzz(test_one_input, custom_mutator)
