"""GDCM decoding in a child process: a damaged file may crash or exhaust the decoder, never the viewer.

Fuzzing found GDCM (SimpleITK's DICOM reader) taking 1.5 to 4 GB for files of about 1 kB, and
dying of a segmentation fault on a JPEG Lossless frame that claimed 18-bit precision. The header
checks in ``dicom._check_encapsulated`` refuse every case found so far with a clear reason, but a
decoder that crashes inside the viewer's process takes the viewer and the user's unsaved boxes with
it. So the files GDCM decodes are decoded by ``python -m napari_wscovid.io.gdcm_child`` under a
memory ceiling and a time limit, and a child that dies is reported as a refusal naming the file it
was decoding; the remaining files are decoded by a fresh child.

One child serves a whole series (starting it costs about 0.7 s), and each image comes back as a
``.npy`` file in GDCM's own pixel type, opened memory-mapped, so a series is never held twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .volume import CTLoadError

logger = logging.getLogger(__name__)

# What the child needs before it decodes anything (Python, numpy, pydicom, SimpleITK mapped in):
# ~450 MB of address space measured on Linux x86-64, with ITK held to one thread.
_BASE_ADDRESS_SPACE = 1024 * 2**20
# A decoded image is held a few times over (GDCM's buffer, the ITK image, the array): generous.
_COPIES_PER_IMAGE = 8
# Seconds allowed: starting the child, then per file (a 512 x 512 JPEG Lossless slice takes ~20 ms).
_START_SECONDS = 60.0
_SECONDS_PER_FILE = 5.0
# A child starts in ~0.7 s: a second one pays off from a few dozen slices on.
_FILES_PER_CHILD = 16
_MAX_CHILDREN = 4


@dataclass(frozen=True)
class GdcmImage:
    """One decoded file: pixels as GDCM returned them (rescale applied) and the image geometry."""

    pixels: np.ndarray  # (frames, rows, cols) or (rows, cols), memory-mapped
    dimension: int
    components: int
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]


class GdcmDecoded:
    """The files of one series decoded by GDCM in a child process; use as a context manager.

    ``result(path)`` returns the :class:`GdcmImage` or raises the :class:`CTLoadError` that
    names the file and why it could not be decoded. Leaving the ``with`` block deletes the
    decoded files (arrays taken from them must be copied before, as ``decode_file`` does).
    """

    def __init__(self, files: Sequence[tuple[Path, int]]):
        """``files``: (path, bytes its decoded pixels take as float64) for each file to decode."""
        self._files = [Path(p) for p, _ in files]
        self._largest = max((int(n) for _, n in files), default=0)
        self._results: dict[Path, GdcmImage | CTLoadError] = {}
        self._folder: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> GdcmDecoded:
        # ignore_cleanup_errors: on Windows a memory map still referenced by a caller keeps its file
        self._folder = tempfile.TemporaryDirectory(prefix="wscovid-gdcm-", ignore_cleanup_errors=True)
        # Several children share a long series (~24 ms per 512 x 512 slice each, measured on P001):
        # 148 slices took 4.3 s in one child; the work is the children's, the threads only wait.
        n_children = min(os.cpu_count() or 1, _MAX_CHILDREN, math.ceil(len(self._files) / _FILES_PER_CHILD))
        chunks = [self._files[i::n_children] for i in range(n_children)]
        try:
            if n_children > 1:
                with ThreadPoolExecutor(n_children) as pool:
                    list(pool.map(self._decode_chunk, chunks))
            elif chunks:
                self._decode_chunk(chunks[0])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _decode_chunk(self, files: list[Path]) -> None:
        while files:
            files = self._run_child(files)

    def __exit__(self, *exc_info) -> None:
        self._results.clear()  # drop the memory maps before their files go
        if self._folder is not None:
            self._folder.cleanup()

    def result(self, path: Path) -> GdcmImage:
        outcome = self._results.get(Path(path))
        if outcome is None:
            raise CTLoadError(f"{Path(path).name}: was not given to the GDCM decoder")
        if isinstance(outcome, CTLoadError):
            raise outcome
        return outcome

    def _run_child(self, files: list[Path]) -> list[Path]:
        """Decode ``files`` in one child; returns the files left when the child died on one."""
        folder = Path(tempfile.mkdtemp(dir=self._folder.name))
        limit = _BASE_ADDRESS_SPACE + _COPIES_PER_IMAGE * self._largest
        job = {"files": [str(f) for f in files], "address_space_limit": limit}
        (folder / "job.json").write_text(json.dumps(job))
        timeout = _START_SECONDS + _SECONDS_PER_FILE * len(files)
        try:
            completed = subprocess.run(
                _child_command(folder),
                capture_output=True,
                text=True,
                timeout=timeout,
                env=_child_environment(),
            )
            failure = None if completed.returncode == 0 else _death(completed.returncode, limit)
            stderr = completed.stderr
        except subprocess.TimeoutExpired as exc:
            failure = f"took longer than {timeout:.0f} s and was stopped"
            stderr = exc.stderr or ""
            stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        for index, file in enumerate(files):
            outcome = folder / f"{index}.json"
            if not outcome.is_file():
                break
            self._results[file] = _read_outcome(folder, index, file)
        else:
            return []
        if failure is None:  # the child ended cleanly without an answer for every file
            failure = "stopped without a result"
        started = _started(folder)
        if started is None or started >= len(files):
            tail = (stderr or "").strip().splitlines()[-1:] or ["no message"]
            raise CTLoadError(f"the GDCM decoder could not be started ({tail[0][:200]})")
        file = files[started]
        logger.warning("GDCM decoder %s on %s", failure, file.name)
        self._results[file] = CTLoadError(f"{file.name}: the JPEG decoder (GDCM) {failure}; file refused")
        return files[started + 1 :]


def _child_environment() -> dict[str, str]:
    """This process's environment, with this package importable wherever the child starts."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "MALLOC_ARENA_MAX": "2"}


def _child_command(folder: Path) -> list[str]:
    return [sys.executable, "-m", __name__, str(folder)]


def _death(returncode: int, limit: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"crashed ({name})"
    if returncode == _OUT_OF_MEMORY:
        return f"needed more than {limit / 2**30:.1f} GiB of memory"
    return f"failed (exit status {returncode})"


def _started(folder: Path) -> int | None:
    try:
        return int((folder / "started").read_text())
    except (OSError, ValueError):
        return None


def _read_outcome(folder: Path, index: int, file: Path) -> GdcmImage | CTLoadError:
    meta = json.loads((folder / f"{index}.json").read_text())
    if "error" in meta:
        return CTLoadError(meta["error"])
    return GdcmImage(
        pixels=np.load(folder / f"{index}.npy", mmap_mode="r"),
        dimension=int(meta["dimension"]),
        components=int(meta["components"]),
        spacing=tuple(meta["spacing"]),
        origin=tuple(meta["origin"]),
        direction=tuple(meta["direction"]),
    )


# ------------------------------------------------------------------------------------------ child

_OUT_OF_MEMORY = 3


def _limit_address_space(limit: int) -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # Windows, or a platform that does not enforce it
        pass


def _child(folder: Path) -> int:
    job = json.loads((folder / "job.json").read_text())
    import SimpleITK as sitk

    from .dicom import _decode_error_text, _read_with_gdcm

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one decoder thread; a predictable footprint
    _limit_address_space(int(job["address_space_limit"]))
    for index, file in enumerate(job["files"]):
        (folder / "started").write_text(str(index))
        path = Path(file)
        try:
            image = _read_with_gdcm(path)
            pixels = sitk.GetArrayViewFromImage(image)
            np.save(folder / f"{index}.npy", pixels)
            meta = {
                "dimension": image.GetDimension(),
                "components": image.GetNumberOfComponentsPerPixel(),
                "spacing": list(image.GetSpacing()),
                "origin": list(image.GetOrigin()),
                "direction": list(image.GetDirection()),
            }
            del pixels, image
        except MemoryError:
            return _OUT_OF_MEMORY
        except CTLoadError as exc:
            meta = {"error": str(exc)}
        except Exception as exc:  # GDCM's own refusal; std::bad_alloc comes through as RuntimeError
            if "bad_alloc" in str(exc):
                return _OUT_OF_MEMORY
            meta = {"error": f"{path.name}: {_decode_error_text(exc)}"}
        (folder / f"{index}.json").write_text(json.dumps(meta))
    return 0


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)
    sys.exit(_child(Path(sys.argv[1])))
