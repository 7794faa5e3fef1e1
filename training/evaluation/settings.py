"""How an evaluation runs: the options of ``python -m training.evaluate`` and the data sources."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.localisation import IOU_THRESHOLD, MIN_LESION_AREA_MM2

SOURCES = ("phantom", "phantom-extra", "covid-ct-md", "ucsd", "medseg", "medseg-seen")
DEFAULT_SOURCES = ("phantom", "phantom-extra", "covid-ct-md", "ucsd", "medseg")


@dataclass
class Settings:
    """How the evaluation runs (the command-line options)."""

    models: list[str]
    out: Path
    train_config: str | None = None
    sources: tuple[str, ...] = DEFAULT_SOURCES
    quick: bool = False
    overwrite: bool = False
    device: str = "cpu"
    ig_steps: int | None = None  # None: the plugin's default
    explain_per_volume: int = 6
    extra_phantoms: int = 1  # per class
    max_cases: int | None = None  # per source
    min_lesion_area_mm2: float = MIN_LESION_AREA_MM2
    iou_threshold: float = IOU_THRESHOLD
    min_box_area_mm2: float = 20.0
    n_boot: int = 1000
    seed: int = 0
    roots: dict[str, str | None] = field(default_factory=dict)  # overrides of the run's data roots
