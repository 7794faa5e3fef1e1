"""Shared fixtures. Real-data tests skip with a reason when ../shared/data is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSCOVID_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public chest-CT data beside the repository, or a skip saying why not."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set WSCOVID_SHARED_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def covid_ct_md(shared_data) -> Path:
    """Folder holding the three COVID-CT-MD DICOM series."""
    root = shared_data / "covid-ct-md" / "sample_data"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    return root


@pytest.fixture(scope="session")
def dicom_robustness(shared_data) -> Path:
    root = shared_data / "dicom-robustness"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    return root
