"""Reading, validating and splitting labelled data (no I/O beyond temporary files)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from adapters.serving.data import (
    LabelledTexts,
    read_jsonl,
    require_trainable,
    stratified_folds,
    stratified_split,
)
from refit.errors import DatasetError


def write(tmp_path, lines: list[str]):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_valid_file_and_skips_blank_lines(tmp_path):
    path = write(
        tmp_path,
        [json.dumps({"text": "hi", "label": "a"}), "", json.dumps({"text": "yo", "label": "b"})],
    )
    data = read_jsonl(path)
    assert data.texts == ("hi", "yo")
    assert data.labels == ("a", "b")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "a", "label": "x"}', '{"text": "b", "label": '], "line 2: malformed JSON"),
        (['{"label": "x"}'], "line 1: missing 'text'"),
        (['{"text": "a"}'], "line 1: missing 'label'"),
        (['{"text": "", "label": "x"}'], "'text' must be a non-empty string"),
        (['{"text": "a", "label": 3}'], "'label' must be a non-empty string"),
        (['["a", "x"]'], "expected a JSON object"),
    ],
)
def test_rejects_bad_lines_naming_the_line(tmp_path, lines, message):
    with pytest.raises(DatasetError, match=message.replace("(", r"\(")):
        read_jsonl(write(tmp_path, lines))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl")
    with pytest.raises(DatasetError, match="holds no examples"):
        read_jsonl(write(tmp_path, [""]))


def test_require_trainable():
    one_label = LabelledTexts.of(["a", "b", "c"], ["x", "x", "x"])
    with pytest.raises(DatasetError, match="at least 2 labels"):
        require_trainable(one_label, min_per_label=3, source="f")
    scarce = LabelledTexts.of(["a", "b", "c", "d"], ["x", "x", "x", "y"])
    with pytest.raises(DatasetError, match="too few examples to split for label.*'y' \\(1\\)"):
        require_trainable(scarce, min_per_label=3, source="f")


def test_stratified_split_keeps_every_label_on_both_sides_and_is_seeded():
    labels = ["a"] * 50 + ["b"] * 10 + ["c"] * 3
    data = LabelledTexts.of([f"t{i}" for i in range(len(labels))], labels)
    rest, held = stratified_split(data, 0.2, seed=7)
    assert len(rest) + len(held) == len(data)
    assert set(rest.texts).isdisjoint(held.texts)
    assert Counter(held.labels) == {"a": 10, "b": 2, "c": 1}
    assert set(rest.labels) == {"a", "b", "c"}
    assert stratified_split(data, 0.2, seed=7) == (rest, held)
    assert stratified_split(data, 0.2, seed=8) != (rest, held)


def test_folds_partition_and_stratify():
    labels = ["a"] * 20 + ["b"] * 10
    folds = stratified_folds(labels, 5, seed=0)
    flat = sorted(i for fold in folds for i in fold)
    assert flat == list(range(30))
    for fold in folds:
        assert Counter(labels[i] for i in fold) == {"a": 4, "b": 2}


def test_fingerprint_changes_with_content_and_order():
    a = LabelledTexts.of(["x", "y"], ["1", "2"])
    assert a.fingerprint() == LabelledTexts.of(["x", "y"], ["1", "2"]).fingerprint()
    assert a.fingerprint() != LabelledTexts.of(["y", "x"], ["2", "1"]).fingerprint()
    assert a.fingerprint() != LabelledTexts.of(["x", "y"], ["1", "3"]).fingerprint()
