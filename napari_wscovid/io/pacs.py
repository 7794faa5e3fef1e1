"""Studies in and results out of a PACS: DICOMweb (QIDO-RS, WADO-RS, STOW-RS through
``dicomweb-client``) and DIMSE C-STORE (``pynetdicom``). No napari, no Qt.

Addresses are written as the command line takes them:

* ``dicomweb:http://HOST:PORT/dicom-web/studies/STUDY_UID`` -- a study to read;
* ``dicomweb:http://HOST:PORT/dicom-web`` -- a server to store to (STOW-RS);
* ``dimse://AET@HOST:PORT`` -- a DICOM node to store to (C-STORE).

Credentials never come from the address or a command-line argument (they would end up in shell
histories and logs): a bearer token from ``WSCOVID_PACS_TOKEN``, or a user and password from
``WSCOVID_PACS_USER`` / ``WSCOVID_PACS_PASSWORD``, or a JSON file (``WSCOVID_PACS_CONFIG``, default
``~/.config/napari-wscovid/pacs.json``: ``{"token": ...}`` or ``{"user": ..., "password": ...}``)
that only its owner may read. They are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

DICOMWEB_PREFIX = "dicomweb:"
DIMSE_PREFIX = "dimse://"
CONFIG_ENV, TOKEN_ENV, USER_ENV, PASSWORD_ENV = (
    "WSCOVID_PACS_CONFIG",
    "WSCOVID_PACS_TOKEN",
    "WSCOVID_PACS_USER",
    "WSCOVID_PACS_PASSWORD",
)
DEFAULT_CONFIG = Path("~/.config/napari-wscovid/pacs.json")
TIMEOUT_S = 60.0
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class PACSError(RuntimeError):
    """A server that is down, slow, refuses or returns a half study; the message says which."""


@dataclass(frozen=True)
class StudyAddress:
    base_url: str  # .../dicom-web
    study_uid: str


def is_dicomweb(text: str) -> bool:
    return str(text).startswith(DICOMWEB_PREFIX)


def parse_study_address(text: str) -> StudyAddress:
    """``dicomweb:URL/studies/UID`` -> base URL and study UID."""
    url = str(text)[len(DICOMWEB_PREFIX) :] if is_dicomweb(text) else str(text)
    head, sep, uid = url.rstrip("/").rpartition("/studies/")
    if not sep or not uid or "/" in uid or not urlsplit(head).scheme.startswith("http"):
        raise ValueError(
            f"not a DICOMweb study address (dicomweb:http://HOST:PORT/dicom-web/studies/UID): {text}"
        )
    return StudyAddress(head, uid)


def _server_name(url: str) -> str:
    """Host and port only: what may appear in messages (no path, no query, no credentials)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


# ------------------------------------------------------------------------------------ credentials
def credentials() -> dict:
    """``{"token": ...}``, ``{"user": ..., "password": ...}`` or ``{}`` (see the module docstring)."""
    if os.environ.get(TOKEN_ENV):
        return {"token": os.environ[TOKEN_ENV]}
    if os.environ.get(USER_ENV):
        return {"user": os.environ[USER_ENV], "password": os.environ.get(PASSWORD_ENV, "")}
    path = Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG).expanduser()
    if not path.is_file():
        return {}
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PACSError(
            f"{path} holds PACS credentials but others may read it (mode {stat.filemode(mode)}); "
            f"run: chmod 600 {path}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PACSError(f"{path}: not a readable JSON credentials file ({type(exc).__name__})") from exc
    return {k: str(v) for k, v in data.items() if k in ("token", "user", "password")}


def _session():
    import requests

    class _Session(requests.Session):
        # requests waits forever by default: a PACS that hangs must end in a message
        def request(self, *args, **kwargs):
            kwargs.setdefault("timeout", TIMEOUT_S)
            return super().request(*args, **kwargs)

    session = _Session()
    found = credentials()
    if "token" in found:
        session.headers["Authorization"] = f"Bearer {found['token']}"
    elif "user" in found:
        session.auth = (found["user"], found.get("password", ""))
    return session


def _client(base_url: str):
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=base_url, session=_session())
    # dicomweb-client retries 5 times with waits growing from 1 s (30 s for a server that is
    # down, measured); 3 tries from 0.25 s say "cannot reach" within about 2 s
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=250)
    return client


def _call(what: str, url: str, fn: Callable):
    """Run one server call; any transport or HTTP failure becomes a :class:`PACSError`."""
    import requests

    try:
        return fn()
    except requests.exceptions.ConnectionError as exc:
        raise PACSError(f"{what}: cannot reach the PACS at {_server_name(url)} (is it running?)") from exc
    except requests.exceptions.Timeout as exc:
        raise PACSError(f"{what}: the PACS at {_server_name(url)} did not answer in time") from exc
    except requests.exceptions.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        hint = " (check the credentials)" if code in (401, 403) else ""
        raise PACSError(f"{what}: the PACS at {_server_name(url)} answered HTTP {code}{hint}") from exc
    except requests.exceptions.RequestException as exc:  # a malformed answer, too many redirects
        raise PACSError(f"{what}: talking to the PACS at {_server_name(url)} failed ({exc})") from exc
    except Exception as exc:
        # dicomweb-client retries a busy server (HTTP 429, 503, 504) and, out of tries, raises
        # retrying's RetryError holding the last attempt: not a requests error
        if type(exc).__name__ != "RetryError":
            raise
        last = getattr(exc.last_attempt, "value", None)
        if getattr(exc.last_attempt, "has_exception", False):
            reason = f"failed after 3 tries ({last[1]})"
        else:
            reason = f"is busy (HTTP {getattr(last, 'status_code', '?')}, after 3 tries); try again later"
        raise PACSError(f"{what}: the PACS at {_server_name(url)} {reason}") from exc


# -------------------------------------------------------------------------------------- reading
def list_studies(
    base_url: str, *, modality: str | None = "CT", date_range: str | None = None, limit: int = 200
):
    """QIDO-RS studies, each ``{"study_uid", "date", "description", "modalities", "n_series"}``.

    No patient name or ID is returned: a list a user picks from on screen needs none."""
    filters = {}
    if modality:
        filters["ModalitiesInStudy"] = modality
    if date_range:
        filters["StudyDate"] = date_range
    found = _call(
        "listing studies",
        base_url,
        lambda: _client(base_url).search_for_studies(
            search_filters=filters, limit=limit, fields=["StudyDescription", "NumberOfStudyRelatedSeries"]
        ),
    )
    out = []
    for item in found:

        def value(tag, item=item):
            entry = item.get(tag, {}).get("Value")
            return entry[0] if entry else ""

        out.append(
            {
                "study_uid": value("0020000D"),
                "date": value("00080020"),
                "description": value("00081030"),
                "modalities": "/".join(item.get("00080061", {}).get("Value", [])),
                "n_series": value("00201206"),
            }
        )
    return out


def fetch_study(
    address: StudyAddress | str,
    dest: str | Path,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Path:
    """Download the study's largest CT series into ``dest`` (one file per instance) and return
    the folder. The choice is logged, as for a folder of several series."""
    import pydicom

    address = parse_study_address(address) if isinstance(address, str) else address
    client = _client(address.base_url)
    series = _call(
        "listing the study's series",
        address.base_url,
        lambda: client.search_for_series(
            study_instance_uid=address.study_uid, fields=["NumberOfSeriesRelatedInstances", "Modality"]
        ),
    )
    ct = []
    for item in series:
        modality = (item.get("00080060", {}).get("Value") or [""])[0]
        count = (item.get("00201209", {}).get("Value") or [0])[0]
        uid = (item.get("0020000E", {}).get("Value") or [""])[0]
        if modality == "CT" and uid:
            ct.append((int(count or 0), uid))
    if not ct:
        raise PACSError(f"study on {_server_name(address.base_url)} holds no CT series")
    ct.sort(reverse=True)
    expected, series_uid = ct[0]
    if len(ct) > 1:
        logger.warning("study holds %d CT series; reading the largest (%d images)", len(ct), expected)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    received = 0
    iterator = _call(
        "reading the series",
        address.base_url,
        lambda: client.iter_series(study_instance_uid=address.study_uid, series_instance_uid=series_uid),
    )
    for ds in _guarded(iterator, "reading the series", address.base_url):
        if cancelled is not None and cancelled():
            raise PACSError("reading the series was cancelled")
        if not isinstance(ds, pydicom.Dataset):
            continue
        received += 1
        ds.save_as(dest / f"image_{received:05d}.dcm", enforce_file_format=True)
        if progress is not None:
            progress(received, expected, "Reading the series from the PACS")
    if expected and received < expected:
        raise PACSError(
            f"the PACS at {_server_name(address.base_url)} sent {received} of the series' {expected} images; "
            "a half study is not analysed"
        )
    if not received:
        raise PACSError(f"the PACS at {_server_name(address.base_url)} sent no image of the series")
    return dest


def _guarded(iterator: Iterable, what: str, url: str):
    it = iter(iterator)
    while True:
        try:
            item = _call(what, url, lambda: next(it))
        except StopIteration:
            return
        yield item


# -------------------------------------------------------------------------------------- sending
def send(target: str, paths: Iterable[str | Path]) -> int:
    """Store DICOM files on ``dicomweb:URL`` (STOW-RS) or ``dimse://AET@HOST:PORT`` (C-STORE);
    returns how many were stored."""
    import pydicom

    datasets = [pydicom.dcmread(p) for p in paths]
    if str(target).startswith(DIMSE_PREFIX):
        return _send_dimse(target, datasets)
    if is_dicomweb(target):
        url = str(target)[len(DICOMWEB_PREFIX) :].rstrip("/")
        _call("storing the results", url, lambda: _client(url).store_instances(datasets))
        return len(datasets)
    raise ValueError(
        f"--send-to takes dicomweb:http://HOST:PORT/dicom-web or dimse://AET@HOST:PORT, got {target}"
    )


def parse_dimse(target: str) -> tuple[str, str, int]:
    text = str(target)[len(DIMSE_PREFIX) :]
    aet, sep, hostport = text.rpartition("@")
    host, _, port = hostport.rpartition(":")
    if not sep or not aet or not host or not port.isdigit() or len(aet) > 16:
        raise ValueError(f"not a DIMSE address (dimse://AET@HOST:PORT): {target}")
    return aet, host, int(port)


def _send_dimse(target: str, datasets) -> int:
    from pynetdicom import AE

    aet, host, port = parse_dimse(target)
    ae = AE(ae_title="WSCOVID")
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        raise PACSError(f"the DICOM node {aet} at {host}:{port} refused or did not answer the association")
    stored = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise PACSError(f"the DICOM node {aet} at {host}:{port} did not answer a C-STORE")
            if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                raise PACSError(
                    f"the DICOM node {aet} at {host}:{port} refused an object (status 0x{code:04X})"
                )
            stored += 1
    finally:
        assoc.release()
    return stored
