"""An annotator's corrections to detected boxes, and re-runs that respect them; no napari, no Qt.

A reading session is: detection proposes boxes ("detected"), the annotator moves or resizes some
("edited"), draws others ("added") and deletes the wrong ones. Every decision must survive a
re-run of detection (with another model, scope or lung method):

* a deleted detection is remembered as **rejected**, with its geometry, and a new detection that
  overlaps it is not shown again;
* the original place of a moved or resized detection is rejected too, so the re-run does not put
  the detection back beside the annotator's corrected copy;
* edited and added boxes stay, and a new detection overlapping one of them is dropped (the
  annotator's box is the correction of it);
* untouched detections of the previous run are replaced by the new run's.

Rejected boxes travel with the box file (rows with origin ``"rejected"``), so a re-opened session
keeps them; they are never drawn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from napari_wscovid.results import Box

REJECTED = "rejected"


def overlap(a: Box, b: Box) -> bool:
    """Whether two boxes share at least one voxel of the same slice."""
    return a.slice == b.slice and a.y0 < b.y1 and b.y0 < a.y1 and a.x0 < b.x1 and b.x0 < a.x1


def place(box: Box) -> tuple[int, int, int, int, int]:
    """Where a box is: its slice and voxel corners."""
    return (box.slice, box.y0, box.x0, box.y1, box.x1)


def same_place(a: Box, b: Box) -> bool:
    return place(a) == place(b)


def as_rejected(box: Box) -> Box:
    """``box`` marked as rejected by the annotator (its geometry, class and score kept)."""
    return dataclasses.replace(box, origin=REJECTED)


def split_rejected(boxes: Iterable[Box]) -> tuple[list[Box], list[Box]]:
    """(boxes to show, rejected boxes) of a box file's rows."""
    shown, rejected = [], []
    for box in boxes:
        (rejected if box.origin == REJECTED else shown).append(box)
    return shown, rejected


def add_rejected(rejected: Sequence[Box], new: Iterable[Box]) -> list[Box]:
    """``rejected`` plus ``new`` (marked rejected), without repeating a place already there."""
    out = list(rejected)
    for box in new:
        if not any(same_place(box, r) for r in out):
            out.append(as_rejected(box))
    return out


def merge_rerun(
    previous: Sequence[Box], detected: Sequence[Box], rejected: Sequence[Box] = ()
) -> tuple[list[Box], dict]:
    """The boxes after a re-run, and what the re-run changed.

    Returns the merged boxes (the annotator's edited and added boxes first, then the new
    detections that overlap none of them and no rejected box) and a summary:
    ``{"kept": annotator's boxes kept, "new": detections not in the previous run,
    "suppressed": detections hidden by a correction, "detected": all new detections,
    "added": the new detections themselves}``.
    """
    kept = [b for b in previous if b.origin not in ("detected", REJECTED)]
    blockers = kept + list(rejected)
    before = {place(b) for b in previous if b.origin == "detected"}
    merged, added, suppressed = list(kept), [], 0
    for box in detected:
        if any(overlap(box, k) for k in blockers):
            suppressed += 1
            continue
        merged.append(box)
        if place(box) not in before:
            added.append(box)
    summary = {"kept": len(kept), "new": len(added), "suppressed": suppressed, "detected": len(detected)}
    return merged, {**summary, "added": added}


@dataclasses.dataclass(frozen=True)
class Reading:
    """One CT's boxes as the annotator left them: the boxes shown, the detections rejected, and
    the slices marked reviewed. The widget keeps this in its boxes layer; every decision about
    what a re-run or an import does to it is made here, without napari."""

    boxes: tuple[Box, ...] = ()
    rejected: tuple[Box, ...] = ()
    reviewed: frozenset[int] = frozenset()

    @classmethod
    def from_rows(cls, rows: Iterable[Box], reviewed: Iterable[int] = ()) -> Reading:
        """The reading a box file holds (its rejected rows apart)."""
        shown, rejected = split_rejected(rows)
        return cls(tuple(shown), tuple(rejected), frozenset(int(z) for z in reviewed))

    @property
    def touched(self) -> bool:
        """Whether there is anything a re-run must respect."""
        return bool(self.boxes or self.rejected)

    def after_rerun(self, detected: Sequence[Box]) -> tuple[Reading, dict]:
        """This reading after a re-run found ``detected`` (:func:`merge_rerun`), and its summary."""
        merged, change = merge_rerun(self.boxes, detected, self.rejected)
        return dataclasses.replace(self, boxes=tuple(merged)), change

    def merged_with(self, imported: Reading) -> Reading:
        """This reading with an imported one beside it: every box of both (one per place), both
        rejected lists and both sets of reviewed slices. An imported untouched detection where
        this reading rejected one stays rejected; an annotator's imported box always comes in."""
        places = {place(b) for b in self.boxes}
        boxes = list(self.boxes)
        for box in imported.boxes:
            if place(box) in places:
                continue
            if box.origin == "detected" and any(overlap(box, r) for r in self.rejected):
                continue
            places.add(place(box))
            boxes.append(box)
        return Reading(
            tuple(boxes),
            tuple(add_rejected(self.rejected, imported.rejected)),
            self.reviewed | imported.reviewed,
        )


def rerun_note(change: dict) -> str:
    """What a re-run did to an annotator's boxes, in one sentence for the status line."""
    return (
        f"{change['new']} new box(es); {change['kept']} of yours kept; "
        f"{change['suppressed']} detection(s) not shown again where you corrected or deleted one."
    )
