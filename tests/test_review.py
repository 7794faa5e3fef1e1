"""The annotator's reading of one CT (napari_wscovid.review.Reading): what re-runs and imports do
to it, without napari."""

from __future__ import annotations

from napari_wscovid.results import Box
from napari_wscovid.review import REJECTED, Reading, rerun_note


def box(z, x0, origin="detected", width=10):
    return Box(z, 10, x0, 20, x0 + width, "COVID-19", 0.8, 1.0, origin)


def test_a_file_s_rows_become_a_reading_with_its_rejected_boxes_apart():
    reading = Reading.from_rows([box(1, 0), box(2, 0, REJECTED)], reviewed=[4, "5"])
    assert reading.boxes == (box(1, 0),) and reading.rejected == (box(2, 0, REJECTED),)
    assert reading.reviewed == {4, 5} and reading.touched
    assert not Reading().touched


def test_a_rerun_keeps_the_annotator_s_boxes_and_marks():
    mine = Reading((box(1, 0, "edited"),), (box(3, 0, REJECTED),), frozenset({2}))
    after, change = mine.after_rerun([box(1, 2), box(3, 1), box(4, 0)])
    assert [(b.slice, b.origin) for b in after.boxes] == [(1, "edited"), (4, "detected")]
    assert after.rejected == mine.rejected and after.reviewed == {2}
    assert change["suppressed"] == 2 and rerun_note(change).startswith("1 new box(es); 1 of yours kept")


def test_an_import_merged_keeps_both_annotators_boxes_even_where_they_overlap():
    mine = Reading((box(1, 0, "edited"), box(2, 0)), (box(5, 0, REJECTED),), frozenset({1}))
    theirs = Reading((box(1, 5, "added"), box(2, 0), box(3, 0)), (box(6, 0, REJECTED),), frozenset({3}))
    merged = mine.merged_with(theirs)
    assert [(b.slice, b.x0, b.origin) for b in merged.boxes] == [
        (1, 0, "edited"),
        (2, 0, "detected"),
        (1, 5, "added"),
        (3, 0, "detected"),
    ]  # one box per place; the overlapping boxes of two annotators both kept
    assert [r.slice for r in merged.rejected] == [5, 6] and merged.reviewed == {1, 3}


def test_an_import_does_not_bring_back_a_detection_the_annotator_deleted():
    mine = Reading((), (box(4, 0, REJECTED),))
    old_export = Reading((box(4, 2), box(4, 3, "edited")))
    merged = mine.merged_with(old_export)
    assert [(b.slice, b.origin) for b in merged.boxes] == [(4, "edited")]
