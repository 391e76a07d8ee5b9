"""The refit command line, run as a subprocess: output contract and every user error."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


def assert_clean_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ('{"text": "hi", "label": "a"}\n{"text": "oops"\n', ["line 2", "malformed JSON"]),
        ('{"label": "a"}\n', ["line 1", "missing 'text'"]),
        ('{"text": "hello"}\n', ["line 1", "missing 'label'"]),
        (
            "".join(f'{{"text": "t{i}", "label": "only"}}\n' for i in range(10)),
            ["at least 2 labels"],
        ),
        (
            "".join(f'{{"text": "t{i}", "label": "big"}}\n' for i in range(10))
            + '{"text": "x1", "label": "rare"}\n{"text": "x2", "label": "rare"}\n',
            ["too few examples to split", "'rare' (2)"],
        ),
    ],
)
def test_train_rejects_bad_data_clearly(tmp_path, content, fragments):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    proc = run_cli("train", "--data", str(data), "--registry", str(tmp_path / "reg"))
    assert_clean_error(proc, *fragments)
    assert not (tmp_path / "reg" / "versions").exists() or not any(
        (tmp_path / "reg" / "versions").iterdir()
    )


def test_train_missing_file(tmp_path):
    proc = run_cli(
        "train", "--data", str(tmp_path / "nope.jsonl"), "--registry", str(tmp_path / "reg")
    )
    assert_clean_error(proc, "nope.jsonl", "no such file")


def test_bad_arguments_exit_2_with_usage(tmp_path):
    proc = run_cli("train", "--data", "x.jsonl", "--search", "bogus")
    assert_clean_error(proc, "invalid choice", "usage:")
    proc = run_cli("train", "--data", "x.jsonl", "--unfreeze-layers", "-1")
    assert_clean_error(proc, "must be 0 or more")


def test_unknown_version_and_empty_registry(tmp_path):
    proc = run_cli("promote", "v7", "--registry", str(tmp_path))
    assert_clean_error(proc, "'v7' is not in the registry")
    proc = run_cli("evaluate", "--data", "data/demo/intents.jsonl", "--registry", str(tmp_path))
    assert_clean_error(proc, "has no current version")
    proc = run_cli("rollback", "--registry", str(tmp_path))
    assert_clean_error(proc, "no previous version")


def test_bad_setting_is_reported_by_name(tmp_path):
    proc = run_cli("models", env={"REFIT_WORKERS": "zero"})
    assert_clean_error(proc, "REFIT_WORKERS")


@pytest.mark.slow
def test_train_json_evaluate_models_promote(tmp_path, demo_data_path):
    registry = str(tmp_path / "reg")
    proc = run_cli(
        "train", "--data", str(demo_data_path), "--registry", registry, "--search", "none", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["version"] == "v1" and summary["promoted"] is True
    assert 0.8 <= summary["metrics"]["accuracy"] <= 1.0
    assert 0 < summary["metrics"]["macro_f1"] <= 1.0
    assert summary["train_seconds"] > 0
    assert "exporting" in proc.stderr  # progress went to stderr, not into the JSON
    int8 = summary["int8"]  # the int8 model's check, and what quantising and checking took
    assert isinstance(int8["passed"], bool) and int8["seconds"] > 0 and 0 < int8["size_mb"] < 40
    assert "quantizing int8 model" in proc.stderr

    proc = run_cli(
        "train",
        "--data",
        str(demo_data_path),
        "--registry",
        registry,
        "--search",
        "none",
        "--seed",
        "1",
        "--no-promote",
        "--json",
    )
    assert json.loads(proc.stdout)["promoted"] is False

    proc = run_cli("models", "--registry", registry, "--json")
    listing = json.loads(proc.stdout)
    assert listing["current"] == "v1" and [v["version"] for v in listing["versions"]] == [
        "v1",
        "v2",
    ]
    human = run_cli("models", "--registry", registry).stdout
    assert "* v1" in human and "  v2" in human

    proc = run_cli(
        "evaluate",
        "--data",
        str(demo_data_path),
        "--registry",
        registry,
        "--version",
        "v2",
        "--json",
    )
    report = json.loads(proc.stdout)
    assert report["version"] == "v2" and report["examples"] == 500 and report["accuracy"] > 0.85

    proc = run_cli("promote", "v2", "--registry", registry)
    assert proc.returncode == 0 and "current is now v2 (was v1)" in proc.stdout
    proc = run_cli("rollback", "--registry", registry)
    assert proc.returncode == 0 and "current is now v1" in proc.stdout


def test_exit_codes_separate_usage_errors_from_internal_failures():
    from refit.cli import EXIT_INTERNAL, EXIT_USAGE, exit_code
    from refit.errors import (
        ConflictError,
        DatasetError,
        ExportParityError,
        RegistryError,
        VersionNotFoundError,
    )

    assert EXIT_USAGE == 2 and EXIT_INTERNAL == 1
    for usage in (
        DatasetError("bad line"),
        VersionNotFoundError("v9"),
        ConflictError("no previous"),
    ):
        assert exit_code(usage) == 2, usage
    for internal in (ExportParityError("onnx differs"), RegistryError("unreadable")):
        assert exit_code(internal) == 1, internal


def test_internal_failure_exits_1_without_traceback(tmp_path):
    # An unreadable registry pointer is not something the user typed wrong: exit 1, one message.
    (tmp_path / "current.json").write_text("{not json")
    proc = run_cli("models", "--registry", str(tmp_path))
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "refit: internal error:" in proc.stderr and "current.json" in proc.stderr
