"""Settings: documented in the README, typos warned about, the log level honoured."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from refit.logs import configure_logging
from refit.settings import (
    README_END,
    README_START,
    RefitSettings,
    SettingsError,
    first_sentence,
    load_settings,
    replace_readme_table,
    settings_table,
    unknown_variables,
)
from tests.servers import ROOT, ServiceProcess

README = ROOT / "README.md"
REGENERATE = "python -m refit.settings --readme README.md"


def test_every_setting_has_a_docstring():
    undocumented = [n for n, f in RefitSettings.model_fields.items() if not f.description]
    assert not undocumented, f"settings without a docstring: {undocumented}"


def test_readme_lists_every_setting_as_generated():
    readme = README.read_text()
    start, end = readme.find(README_START), readme.find(README_END)
    assert 0 <= start < end, f"README.md lacks the markers {README_START} ... {README_END}"
    assert readme[start + len(README_START):end].strip() == settings_table().strip(), (
        f"README.md's settings table is out of date: run `{REGENERATE}`"
    )


def test_settings_table_names_each_variable_its_default_and_meaning():
    rows = {line.split(" | ")[0].strip("| `"): line for line in settings_table().splitlines()[2:]}
    assert set(rows) == {f"REFIT_{name.upper()}" for name in RefitSettings.model_fields}
    assert "| `REFIT_WORKERS` | `2` | Serving worker processes;" in rows["REFIT_WORKERS"]
    assert "| unset |" in rows["REFIT_ADMIN_TOKEN"]
    # The description is the first sentence only, with reStructuredText literals as Markdown.
    assert rows["REFIT_INFERENCE_THREADS"].endswith("| Batches each worker runs at once. |")
    assert "`/predict`" in rows["REFIT_MAX_TEXTS_PER_REQUEST"]


def test_first_sentence_does_not_stop_at_an_abbreviation():
    assert first_sentence("A URL, e.g. ``x``. Then more.") == "A URL, e.g. ``x``."
    assert first_sentence("Spread over\n    two lines. Second.") == "Spread over two lines."
    assert first_sentence("One sentence, no full stop") == "One sentence, no full stop"


def test_readme_table_is_rewritten_between_the_markers_only():
    readme = f"intro\n{README_START}\nold table\n{README_END}\noutro\n"
    updated = replace_readme_table(readme, "| new |\n")
    assert updated == f"intro\n{README_START}\n| new |\n{README_END}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        replace_readme_table("no markers here", "| new |\n")


def test_settings_command_prints_the_table():
    done = subprocess.run([sys.executable, "-m", "refit.settings", "--markdown"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == settings_table()


# -- variables that are no setting ----------------------------------------------------------------


def test_a_misspelt_variable_is_named_with_the_closest_setting():
    messages = unknown_variables({"REFIT_WORKRES": "4", "REFIT_WORKERS": "2", "HOME": "/root"})
    assert len(messages) == 1
    assert "REFIT_WORKRES" in messages[0] and "did you mean REFIT_WORKERS?" in messages[0]


def test_a_variable_like_no_setting_is_named_without_a_guess():
    (message,) = unknown_variables({"REFIT_COLOUR_SCHEME": "dark"})
    assert "REFIT_COLOUR_SCHEME" in message and "did you mean" not in message


def test_a_removed_setting_says_why_it_went():
    (message,) = unknown_variables({"REFIT_BATCH_MAX_LATENCY_MS": "50"})
    assert "no longer a setting" in message and "503" in message


def test_real_settings_in_any_case_and_benchmark_variables_are_not_reported():
    environ = {name.upper(): "1" for name in RefitSettings.model_fields}
    environ |= {"refit_workers": "2", "REFIT_BENCH_BODIES": "x", "PATH": "/bin"}
    assert unknown_variables(environ) == []


def test_load_settings_logs_a_warning_for_each_unknown_variable(monkeypatch, caplog):
    monkeypatch.setenv("REFIT_DRIFT_WINDOWS", "3000")
    monkeypatch.setenv("REFIT_DRIFT_WINDOW", "2500")
    with caplog.at_level(logging.WARNING, logger="refit.settings"):
        settings = load_settings()
    assert settings.drift_window == 2500
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("REFIT_DRIFT_WINDOWS" in w and "REFIT_DRIFT_WINDOW?" in w for w in warnings), (
        warnings
    )


# -- log level ------------------------------------------------------------------------------------


@pytest.fixture
def refit_logger_restored():
    logger = logging.getLogger("refit")
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR"])
def test_log_level_sets_every_refit_logger(level, refit_logger_restored):
    configure_logging(RefitSettings(log_level=level))
    for name in ("refit.predictor", "refit.drift", "refit.retrain", "refit.http"):
        assert logging.getLogger(name).getEffectiveLevel() == getattr(logging, level), name


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name} {record.getMessage()}")


def test_log_level_lets_refit_messages_through_a_quieter_root(refit_logger_restored):
    """A BentoML worker keeps its root logger at WARNING; refit's INFO messages still show."""
    root = logging.getLogger()
    old_level, collect = root.level, _Collect()
    root.setLevel(logging.WARNING)
    root.addHandler(collect)
    try:
        configure_logging(RefitSettings(log_level="INFO"))
        logging.getLogger("refit.predictor").info("serving model v7")
        logging.getLogger("refit.predictor").debug("below the level")
        logging.getLogger("elsewhere").info("not refit's, the root's level applies")
    finally:
        root.removeHandler(collect)
        root.setLevel(old_level)
    assert collect.messages == ["refit.predictor serving model v7"]


def test_a_bad_log_level_stops_start_up_naming_the_variable(monkeypatch):
    monkeypatch.setenv("REFIT_LOG_LEVEL", "LOUD")
    with pytest.raises(SettingsError, match="REFIT_LOG_LEVEL"):
        load_settings()


@pytest.mark.server
def test_server_warns_of_a_misspelt_variable_and_logs_at_the_set_level(tmp_path, trained_registry):
    """End to end: a real worker logs the typo warning and refit's INFO messages (BentoML keeps
    the root logger at WARNING, which used to hide them)."""
    service = ServiceProcess(
        registry=trained_registry.root, data_dir=tmp_path / "var", workers=1,
        env={"REFIT_SWAP_POLL_INTERVALS": "5", "REFIT_LOG_LEVEL": "INFO"},
    ).start()
    try:
        log = service.log()
    finally:
        service.stop()
    assert "REFIT_SWAP_POLL_INTERVALS" in log and "did you mean REFIT_SWAP_POLL_INTERVAL_S?" in log
    version = trained_registry.current().name
    assert f"serving model {version}" in log, log
