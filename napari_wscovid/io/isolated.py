"""Native decoders in a child process: a damaged file may crash, hang or exhaust a decoder, never the viewer.

Fuzzing found GDCM (SimpleITK's DICOM reader) taking 1.5 to 4 GB for files of about 1 kB, and
dying of a segmentation fault on a JPEG Lossless frame that claimed 18-bit precision. An audit of
the other readers then found ITK's MetaImage and NRRD readers crashing on headers of 24 bytes to
1.2 kB (a ``%s`` in a data-file pattern is used as a printf format; an ASCII token longer than a
stack buffer; ``NDims = -1``), looping forever (``NDims = -1`` again; a detached data file
``/dev/zero`` read line by line), reading ``/dev/stdin``, and, because ITK picks its reader by
content, decoding a DICOM renamed ``.mha`` with GDCM; and Pillow taking 4 GB and 100 s on a 516 kB
PNG. A crash in the viewer's process takes the viewer and the user's unsaved boxes with it, so
these readers run in ``python -m napari_wscovid.io.isolated``:

* under an address-space ceiling (Linux; 1 GiB for the interpreter and libraries, raised for the
  pixels once the header's size has passed ``check_load_size``), so a lying header fails the
  allocation instead of taking the machine's memory;
* under a time limit, with stdin closed;
* one child per ITK or picture file, one per core for a DICOM series' compressed files (starting
  a child costs about 0.7 s); a child that dies is reported as a refusal naming the file it was
  on, and a series' remaining files go to a fresh child.

An audit of the in-process DICOM decoders then found pylibjpeg-openjpeg writing past its buffer on
a JPEG 2000 palette box (heap corruption, the process aborted), 1.3-50 kB codestreams whose tile
and component counts took 1.2-4.4 GB, and a JP2 box of length 0 on which pydicom's own header
parser loops forever: every compressed DICOM syntax now decodes in a child (``"pydicom"`` task).

Each image comes back as a ``.npy`` file, opened memory-mapped, so it is never held twice. The
header checks in ``dicom._check_encapsulated`` still refuse the known damages first, with their
own reasons.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import volume
from .volume import BYTES_PER_VOXEL, CTLoadError

logger = logging.getLogger(__name__)

# What the child needs before it decodes anything (Python, numpy, pydicom, SimpleITK, Pillow mapped
# in): ~450 MB of address space measured on Linux x86-64, with ITK held to one thread.
_BASE_ADDRESS_SPACE = 1024 * 2**20
# A decoded image is held a few times over (the decoder's buffer, the ITK image, the array).
_COPIES_PER_IMAGE = 8
# Seconds allowed to start the child (a cold start after boot measured 20 s), then to each file:
# 5 s plus 1 s per 10 MB on disk (a 512 x 512 JPEG Lossless slice takes ~20 ms, a 105 M-voxel
# gzipped NRRD 13 s). A hung decoder is stopped that long after it began its file.
_START_SECONDS = 30.0
_SECONDS_PER_FILE = 5.0
_BYTES_PER_SECOND = 10 * 2**20
# A child starts in ~0.7 s: a second one pays off from a few dozen slices on.
_FILES_PER_CHILD = 16
_MAX_CHILDREN = 4
# What ITK's MetaImage reader prints, and otherwise ignores, when compressed pixel data is damaged:
# the image it returns then holds whatever memory it was given.
_DECODER_COMPLAINTS = ("Uncompress failed",)


@dataclass(frozen=True)
class DecodedImage:
    """One decoded file: its pixels and the grid its reader gave. From :class:`Decoding` the pixels
    are a read-only memory map, valid inside its ``with`` block; from :func:`read_isolated`, a copy."""

    pixels: np.ndarray  # ITK/GDCM: (frames, rows, cols) or (rows, cols); pictures: (rows, cols)
    dimension: int
    components: int
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]


class Decoding:
    """Files decoded by one kind of child (``task``); use as a context manager.

    ``result(path)`` returns the :class:`DecodedImage` or raises the :class:`CTLoadError` naming
    the file and why it could not be decoded. Leaving the ``with`` block deletes the decoded files
    (arrays taken from them must be copied before).
    """

    def __init__(self, task: str, files: Sequence[tuple[Path, int]], max_bytes: int = 0, plugin: str = ""):
        """``task``: ``"gdcm"``, ``"pydicom"`` (with its decoding ``plugin``), ``"itk"`` or
        ``"picture"``; ``files``: (path, bytes its decoded pixels take as float64; 0 when only its
        header can tell) for each file to decode."""
        self._task = task
        self._plugin = plugin
        self._files = [Path(p) for p, _ in files]
        self._largest = max((int(n) for _, n in files), default=0)
        self._max_bytes = int(max_bytes)
        self._results: dict[Path, DecodedImage | CTLoadError] = {}
        self._folder: tempfile.TemporaryDirectory | None = None

    def __enter__(self):
        # ignore_cleanup_errors: on Windows a memory map still referenced by a caller keeps its file
        self._folder = tempfile.TemporaryDirectory(prefix="wscovid-decode-", ignore_cleanup_errors=True)
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

    def __exit__(self, *exc_info) -> None:
        self._results.clear()  # drop the memory maps before their files go
        if self._folder is not None:
            self._folder.cleanup()

    def result(self, path: Path) -> DecodedImage:
        outcome = self._results.get(Path(path))
        if outcome is None:
            raise CTLoadError(f"{Path(path).name}: was not given to the decoder")
        if isinstance(outcome, CTLoadError):
            raise outcome
        return outcome

    def _decode_chunk(self, files: list[Path]) -> None:
        while files:
            files = self._run_child(files)

    def _run_child(self, files: list[Path]) -> list[Path]:
        """Decode ``files`` in one child; returns the files left when the child died on one."""
        folder = Path(tempfile.mkdtemp(dir=self._folder.name))
        # The pixels' share is granted up front when the caller knows the size (a DICOM header
        # did), else by the child once the file's own header has passed check_load_size.
        pixel_share = _COPIES_PER_IMAGE * (self._largest or self._max_bytes // BYTES_PER_VOXEL * 8)
        job = {
            "task": self._task,
            "plugin": self._plugin,
            "files": [str(f) for f in files],
            "max_bytes": self._max_bytes,
            # the memory free as the viewer's process sees it, for the child's size check
            "available_bytes": volume.available_memory_bytes(),
            "soft_limit": _BASE_ADDRESS_SPACE + _COPIES_PER_IMAGE * self._largest,
            "hard_limit": _BASE_ADDRESS_SPACE + pixel_share,
        }
        (folder / "job.json").write_text(json.dumps(job))
        failure, stderr = _watch(folder, files, job["hard_limit"])
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
            more = f" and {len(files) - 1} more" if len(files) > 1 else ""
            raise CTLoadError(
                f"{files[0].name}{more}: the {_READERS[self._task]} could not be started "
                f"({failure}; {tail[0][:200]})"
            )
        file = files[started]
        logger.warning("%s %s on %s", _READERS[self._task], failure, file.name)
        self._results[file] = CTLoadError(f"{file.name}: the {_READERS[self._task]} {failure}; file refused")
        return files[started + 1 :]


_READERS = {
    "gdcm": "JPEG decoder (GDCM)",
    "pydicom": "pixel decoder (pydicom)",
    "itk": "MetaImage/NRRD reader (ITK)",
    "picture": "image decoder (Pillow)",
}


def read_isolated(
    task: str, path: str | os.PathLike, max_bytes: int, in_process: bool = False
) -> DecodedImage:
    """One MetaImage/NRRD (``"itk"``) or PNG/JPG (``"picture"``) file read in a child process;
    its pixels are the caller's own (a writable copy that outlives the child's files).

    ``in_process`` runs the same reader here, without a child: for files one trusts, read by the
    thousand (training's UCSD images), where ~0.7 s of child start per file would add minutes.
    """
    if in_process:
        saved = []
        job = {"max_bytes": int(max_bytes), "available_bytes": volume.available_memory_bytes(), "plugin": ""}
        # a copy at once: the pixels may be a view of an ITK image freed when the reader returns
        meta = _TASKS[task](Path(path), job, lambda pixels: saved.append(np.array(pixels)))
        return _decoded(saved[0], meta)
    with Decoding(task, [(Path(path), 0)], max_bytes) as decoding:
        image = decoding.result(Path(path))
        return dataclasses.replace(image, pixels=np.array(image.pixels))


def _file_seconds(path: Path) -> float:
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    return _SECONDS_PER_FILE + size / _BYTES_PER_SECOND


def _watch(folder: Path, files: list[Path], limit: int) -> tuple[str | None, str]:
    """Run the child on ``folder``'s job; (why it failed or None, its stderr). It is stopped when
    it has not started its first file ``_START_SECONDS`` after launch, or has spent longer on one
    file than :func:`_file_seconds` allows (so a hang costs seconds, not minutes per series)."""
    with open(folder / "child.stderr", "w+") as err:
        child = subprocess.Popen(
            _child_command(folder),
            stdin=subprocess.DEVNULL,  # a data file named /dev/stdin must not wait on the terminal
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=_child_environment(),
        )
        try:
            current, since, allowed = None, time.monotonic(), _START_SECONDS
            while True:
                try:
                    returncode = child.wait(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    pass
                started = _started(folder)
                if started is not None and started != current and started < len(files):
                    current, since, allowed = started, time.monotonic(), _file_seconds(files[started])
                if time.monotonic() - since > allowed:
                    child.kill()
                    child.wait()
                    err.seek(0)
                    return f"took longer than {allowed:.0f} s and was stopped", err.read()
        finally:
            if child.poll() is None:  # interrupted here (Ctrl-C): no orphan decoder left running
                child.kill()
                child.wait()
        err.seek(0)
        return (None if returncode == 0 else _death(returncode, limit)), err.read()


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


def _read_outcome(folder: Path, index: int, file: Path) -> DecodedImage | CTLoadError:
    meta = json.loads((folder / f"{index}.json").read_text())
    if "error" in meta:
        return CTLoadError(meta["error"])
    return _decoded(np.load(folder / f"{index}.npy", mmap_mode="r"), meta)


def _decoded(pixels: np.ndarray, meta: dict) -> DecodedImage:
    return DecodedImage(
        pixels=pixels,
        dimension=int(meta["dimension"]),
        components=int(meta["components"]),
        spacing=tuple(meta["spacing"]),
        origin=tuple(meta["origin"]),
        direction=tuple(meta["direction"]),
    )


# ------------------------------------------------------------------------------------------ child

_OUT_OF_MEMORY = 3


def _set_address_space(soft: int, hard: int | None = None) -> None:
    """The child's ceiling; the soft limit may later be raised up to the hard one."""
    try:
        import resource

        current_hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        hard = current_hard if hard is None else hard
        resource.setrlimit(resource.RLIMIT_AS, (min(soft, hard), hard))
    except (ImportError, ValueError, OSError):  # Windows, or a platform that does not enforce it
        pass


def _raise_ceiling(job: dict, n_voxels: int) -> None:
    """In a child, once a header's size has passed the load check: room for its pixels."""
    if job.get("in_child"):
        _set_address_space(_BASE_ADDRESS_SPACE + _COPIES_PER_IMAGE * 8 * n_voxels)


def _image_meta(image) -> dict:
    return {
        "dimension": image.GetDimension(),
        "components": image.GetNumberOfComponentsPerPixel(),
        "spacing": list(image.GetSpacing()),
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def _decode_gdcm(path: Path, job: dict, save) -> dict:
    import SimpleITK as sitk

    from .dicom import _read_with_gdcm

    image = _read_with_gdcm(path)
    save(sitk.GetArrayViewFromImage(image))
    return _image_meta(image)


def _decode_pydicom(path: Path, job: dict, save) -> dict:
    """Stored values (no rescale) as pydicom's decoder gives them, e.g. JPEG 2000 or RLE."""
    import pydicom

    ds = pydicom.dcmread(path)
    if job["plugin"]:
        ds.pixel_array_options(decoding_plugin=job["plugin"])
    pixels = np.asarray(ds.pixel_array)
    save(pixels)
    return {"dimension": pixels.ndim, "components": 1, "spacing": [], "origin": [], "direction": []}


def _decode_itk(path: Path, job: dict, save) -> dict:
    import SimpleITK as sitk

    from .formats import check_memory

    name = path.name
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise CTLoadError(f"{name}: unreadable image header") from exc
    size = reader.GetSize()
    if reader.GetNumberOfComponents() != 1:
        raise CTLoadError(
            f"{name}: {reader.GetNumberOfComponents()} components per voxel; a grey-level volume is needed"
        )
    if len(size) not in (2, 3):
        raise CTLoadError(f"{name}: {len(size)}-D image; only 2-D or 3-D images are supported")
    _raise_ceiling(job, check_memory(name, size, job["max_bytes"], job["available_bytes"]))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CTLoadError(f"{name}: pixel data unreadable or truncated") from exc
    save(sitk.GetArrayViewFromImage(image))
    return _image_meta(image)


def _decode_picture(path: Path, job: dict, save) -> dict:
    from PIL import Image

    from .formats import check_memory

    name = path.name
    try:
        with Image.open(path) as image:
            shape = (1, image.height, image.width)
            _raise_ceiling(job, check_memory(name, shape, job["max_bytes"], job["available_bytes"]))
            data = np.asarray(image)
    except (CTLoadError, MemoryError):
        raise
    except Exception as exc:
        raise CTLoadError(f"{name}: unreadable image ({type(exc).__name__})") from exc
    if data.ndim == 3:  # colour: the luma of its first three channels, alpha left out
        if data.shape[2] >= 3:
            data = data[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        else:
            data = data[..., 0]
    save(data)
    return {
        "dimension": 2,
        "components": 1,
        "spacing": [1.0, 1.0],
        "origin": [0.0, 0.0],
        "direction": [1, 0, 0, 1],
    }


_TASKS = {"gdcm": _decode_gdcm, "pydicom": _decode_pydicom, "itk": _decode_itk, "picture": _decode_picture}


def _child(folder: Path) -> int:
    job = json.loads((folder / "job.json").read_text())
    job["in_child"] = True
    decode = _TASKS[job["task"]]
    from .dicom import _decode_error_text, _is_decoder_panic

    if job["task"] in ("gdcm", "itk"):  # pydicom's and Pillow's children need no ITK loaded
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one decoder thread, a predictable footprint
    _set_address_space(int(job["soft_limit"]), int(job["hard_limit"]))
    for index, file in enumerate(job["files"]):
        (folder / "started").write_text(str(index))
        path = Path(file)
        complaints = folder / f"{index}.stderr"
        # the decoders' own messages (C++ std::cerr) go to a file this child reads back
        with open(complaints, "w") as sink:
            os.dup2(sink.fileno(), 2)
        try:
            meta = decode(path, job, lambda pixels, i=index: np.save(folder / f"{i}.npy", pixels))
            said = complaints.read_text(errors="replace")
            complaint = next((c for c in _DECODER_COMPLAINTS if c in said), None)
            if complaint:
                meta = {"error": f"{path.name}: damaged pixel data (the decoder reported {complaint!r})"}
        except MemoryError:
            return _OUT_OF_MEMORY
        except CTLoadError as exc:
            meta = {"error": str(exc)}
        except BaseException as exc:  # the decoder's refusal; std::bad_alloc comes as a RuntimeError
            if not isinstance(exc, Exception) and not _is_decoder_panic(exc):
                raise  # a Rust decoder's panic (pylibjpeg-rle) is a refusal; Ctrl-C is not
            if "bad_alloc" in str(exc):
                return _OUT_OF_MEMORY
            meta = {"error": f"{path.name}: {_decode_error_text(exc)}"}
        (folder / f"{index}.json").write_text(json.dumps(meta))
    return 0


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)
    sys.exit(_child(Path(sys.argv[1])))
