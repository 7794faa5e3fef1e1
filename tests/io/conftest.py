"""Fixtures for the io tests; the builders live in io_builders.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from io_builders import write_series


@pytest.fixture
def series_folder(tmp_path) -> Path:
    """A clean 5-slice CT series in its own folder."""
    folder = tmp_path / "series"
    write_series(folder)
    return folder
