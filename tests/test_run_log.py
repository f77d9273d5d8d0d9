"""The run log: written as usual, and a log that cannot be written warns once, with no traceback."""

from __future__ import annotations

import logging

from hydra import compose, initialize_config_module

import moeprune.cli  # noqa: F401  (registers the schema and the sweeper plugin)
from moeprune.run_log import RunLogFile


def test_a_run_log_on_a_full_disk_warns_once_and_the_program_goes_on(capsys):
    log = logging.getLogger("moeprune.test_run_log")
    handler = RunLogFile("/dev/full")  # every write fails with ENOSPC, as on a full disk
    log.addHandler(handler)
    try:
        for i in range(3):
            log.warning("line %d", i)
    finally:
        log.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert err.splitlines() == ["moeprune: warning: cannot write the run log /dev/full (No space left on device); "
                                "the run goes on without it"], err
    assert "Traceback" not in err and "Logging error" not in err


def test_a_log_that_can_be_written_gets_every_line(tmp_path):
    log = logging.getLogger("moeprune.test_run_log.ok")
    handler = RunLogFile(tmp_path / "moeprune.log")
    log.addHandler(handler)
    try:
        log.warning("first")
        log.warning("second")
    finally:
        log.removeHandler(handler)
        handler.close()
    assert (tmp_path / "moeprune.log").read_text().splitlines() == ["first", "second"]


def test_the_run_dirs_log_file_is_written_by_that_handler():
    with initialize_config_module(config_module="moeprune.conf", version_base="1.3"):
        cfg = compose(config_name="run", return_hydra_config=True)
    handler = cfg.hydra.job_logging.handlers.file  # (its filename needs a run: left unresolved)
    assert handler["class"] == "moeprune.run_log.RunLogFile" and handler._get_node("filename")._value().endswith(
        "${hydra.job.name}.log") and cfg.hydra.job.name == "moeprune"
