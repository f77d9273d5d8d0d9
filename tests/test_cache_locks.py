"""The cache's per-artifact locks: the file goes with its holder's release (none pile up in
`<cache>/.locks/`), and removing a file never lets two processes hold one lock name at once."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from moeprune import artifacts

HOLDER = """
import os, sys, time
from moeprune.artifacts import build_lock
lock, inside = sys.argv[1], sys.argv[2]
for _ in range(30):
    with build_lock(lock):
        fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another holder is inside
        time.sleep(0.002)
        os.close(fd)
        os.unlink(inside)
"""


def test_a_released_lock_leaves_no_file(tmp_path):
    lock = tmp_path / ".locks" / "profile-abc.lock"
    with artifacts.build_lock(lock) as waited:
        assert not waited and lock.exists()
    assert not lock.exists()


def test_four_processes_never_hold_one_lock_together_while_its_file_comes_and_goes(tmp_path):
    lock, inside = tmp_path / ".locks" / "x.lock", tmp_path / "inside"
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(inside)], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert not lock.exists()


def test_removing_a_dead_builders_temp_dir_says_so_and_leaves_no_lock_file(tmp_path, caplog):
    cache = tmp_path / "cache"
    dead = cache / "profile" / ".bbb.tmp-2"
    dead.mkdir(parents=True)
    lock = lambda stage, key: cache / ".locks" / f"{stage}-{key}.lock"  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="moeprune.artifacts"):
        assert artifacts.remove_dead_temps(cache, ["profile"], lock) == [dead]
    assert str(dead) in caplog.text and "died" in caplog.text
    assert list(Path(cache, ".locks").glob("*.lock")) == []


def test_a_failed_build_leaves_no_empty_stage_dir_it_created_and_keeps_one_that_was_there(tmp_path):
    import pytest

    for existed in (False, True):
        stage_dir = tmp_path / f"existed-{existed}" / "profile"
        if existed:
            stage_dir.mkdir(parents=True)
        with pytest.raises(RuntimeError):
            with artifacts.atomic_dir(stage_dir / "abc") as tmp:
                (tmp / "half.bin").write_bytes(b"x")
                raise RuntimeError("the stage failed")
        assert stage_dir.exists() == existed and (not existed or list(stage_dir.iterdir()) == [])
