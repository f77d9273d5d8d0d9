"""Bad input from the file system, through the real CLI: a read-only run dir or cache, a full disk
under the run dir, the profile being saved or the generation cache. Tests run as root, whom
permission bits do not stop, so each case runs in a mount namespace of its own (`unshare -m`) with a
real read-only bind mount or a small tmpfs; they skip, saying why, where mounts are not allowed."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = ["calibration.samples_per_class=2", "bench.n_per_class=1"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Gemma 4 MoE, after checking this host lets a test mount a tmpfs and a read-only bind."""
    from conftest import save_tiny_gemma4

    probe = tmp_path_factory.mktemp("probe")
    script = f"mount -t tmpfs -o size=64k tmpfs {probe} && mount --bind {probe} {probe} && mount -o remount,bind,ro {probe}"
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        r = None
    if r is None or r.returncode != 0:
        pytest.skip("no mount namespace here (unshare -m, mount -t tmpfs, mount -o remount,bind,ro: "
                    f"{r.stderr.strip() if r else 'no unshare'}); root ignores permission bits, so a read-only dir "
                    "or a full disk needs a real mount")
    return save_tiny_gemma4(tmp_path_factory.mktemp("src") / "tiny_gemma4")


class Namespace:
    """A bash script run in a mount namespace of its own: its mounts vanish with it, so what the
    runs left on a tmpfs is listed from inside."""

    def __init__(self, root: Path):
        self.out = root / "ns-out"
        self.out.mkdir()
        self.lines: list[str] = []

    def read_only(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.lines.append(f"mount --bind {_q(path)} {_q(path)} && mount -o remount,bind,ro {_q(path)}")

    def tmpfs(self, path: Path, size: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.lines.append(f"mount -t tmpfs -o size={size} tmpfs {_q(path)}")

    def fill(self, path: Path) -> None:
        self.lines.append(f"dd if=/dev/zero of={_q(path / 'filler')} bs=4k 2>/dev/null || true")

    def moeprune(self, name: str, argv: list[str], cache: Path) -> None:
        cmd = " ".join(_q(a) for a in [sys.executable, "-m", "moeprune", *argv])
        out = self.out / name
        self.lines.append(f"env MOEPRUNE_CACHE={_q(cache)} {cmd} >{_q(out)}.out 2>{_q(out)}.err "
                          f"&& echo 0 >{_q(out)}.rc || echo $? >{_q(out)}.rc")

    def listing(self, name: str, path: Path) -> None:
        """Every path under `path` with its type and size, as the namespace sees it."""
        self.lines.append(f"find {_q(path)} -mindepth 1 -printf '%P %y %s\\n' | sort >{_q(self.out / name)}.ls")

    def run(self) -> None:
        r = subprocess.run(["unshare", "-m", "bash", "-euc", "\n".join(self.lines)], capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr

    def result(self, name: str) -> tuple[int, str]:
        return int((self.out / f"{name}.rc").read_text()), (self.out / f"{name}.err").read_text()

    def files(self, name: str) -> list[tuple[str, str, int]]:
        rows = [line.split(" ") for line in (self.out / f"{name}.ls").read_text().splitlines()]
        return [(path, kind, int(size)) for path, kind, size in rows]


def _q(x) -> str:
    return shlex.quote(str(x))


def refused(code: int, stderr: str, message: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("moeprune: error:")]
    assert code == 2, stderr
    assert len(errors) == 1 and message in errors[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("existing", [False, True], ids=["a run dir to create", "a reused run dir"])
def test_a_read_only_run_dir_is_refused_before_anything_is_written(model, tmp_path, existing):
    ro, cache = tmp_path / "ro", tmp_path / "cache"
    run = ro / "run"
    if existing:
        run.mkdir(parents=True)
        (run / "run.json").write_text('{"stages": {}}\n')
    ns = Namespace(tmp_path)
    ns.read_only(ro)
    ns.moeprune("run", [f"model.path={model}", f"hydra.run.dir={run}", *SMALL, "stage=profile"], cache)
    ns.run()
    refused(*ns.result("run"), f"the run dir (hydra.run.dir) {run} is not writable")
    assert not cache.exists()


@pytest.mark.slow  # three runs, two with evaluation (~35 s on 2 cores)
def test_a_read_only_cache_serves_a_cached_run_and_refuses_one_that_must_build(model, tmp_path):
    cache = tmp_path / "cache"
    base = [f"model.path={model}", *SMALL]
    ns = Namespace(tmp_path)
    ns.moeprune("warm", [*base, f"hydra.run.dir={tmp_path / 'warm'}"], cache)  # every stage, evaluation included
    ns.read_only(cache)
    ns.moeprune("cached", [*base, f"hydra.run.dir={tmp_path / 'cached'}"], cache)
    ns.moeprune("to_build", [*base, f"hydra.run.dir={tmp_path / 'to_build'}", "keep.drop_fraction=0.5"], cache)
    ns.listing("cache", cache)
    ns.run()
    assert ns.result("warm")[0] == 0, ns.result("warm")[1]
    code, stderr = ns.result("cached")
    assert code == 0 and "Traceback" not in stderr, stderr
    links = {p.name: p.resolve() for p in (tmp_path / "cached").iterdir() if p.is_symlink()}
    assert links == {p.name: p.resolve() for p in (tmp_path / "warm").iterdir() if p.is_symlink()}
    assert set(links) == {"profile", "dropmap", "prune", "evaluate_base", "evaluate"}
    refused(*ns.result("to_build"), f"paths.cache_dir={cache} is not writable, and this run has to build dropmap, "
                                    "prune, evaluate")
    assert not (tmp_path / "to_build").exists()
    assert not any(".tmp-" in path for path, _, _ in ns.files("cache"))


def test_a_full_disk_under_the_run_dir_is_refused_before_hydra_writes_into_it(model, tmp_path):
    full, cache = tmp_path / "full", tmp_path / "cache"
    ns = Namespace(tmp_path)
    ns.tmpfs(full, "1m")
    ns.fill(full)
    ns.moeprune("run", [f"model.path={model}", f"hydra.run.dir={full / 'run'}", *SMALL, "stage=profile"], cache)
    ns.listing("full", full)
    ns.run()
    refused(*ns.result("run"), f"the run dir (hydra.run.dir) {full / 'run'} is on a disk with 0 bytes free")
    assert [p for p, _, _ in ns.files("full")] == ["filler"], "no .hydra/, no moeprune.log"
    assert not cache.exists()


def test_a_full_disk_while_the_profile_is_saved_keeps_nothing_of_it(model, tmp_path):
    full, run = tmp_path / "full", tmp_path / "run"
    ns = Namespace(tmp_path)
    ns.tmpfs(full, "1m")
    ns.fill(full)
    ns.moeprune("run", [f"model.path={model}", f"hydra.run.dir={run}", *SMALL, "stage=profile"], full / "cache")
    ns.listing("full", full)
    ns.run()
    refused(*ns.result("run"), "the profile stage ran out of disk space building")
    assert "No space left on device" in ns.result("run")[1]
    left = [(p, kind, size) for p, kind, size in ns.files("full") if p != "filler"]
    assert all(kind == "d" or (p.startswith("cache/.locks/") and size == 0) for p, kind, size in left), left
    assert not any(".tmp-" in p for p, _, _ in left)
    assert json.loads((run / "run.json").read_text()) == {"stages": {}} and not (run / "profile").exists()


def test_a_full_disk_for_the_generation_cache_keeps_the_stages_built_before_it(model, tmp_path):
    full, run = tmp_path / "full", tmp_path / "run"
    argv = [f"model.path={model}", f"hydra.run.dir={run}", *SMALL]
    ns = Namespace(tmp_path)
    ns.tmpfs(full, "8m")
    ns.moeprune("prune", [*argv, "stage=prune"], full / "cache")
    ns.fill(full)
    ns.moeprune("run", argv, full / "cache")
    ns.listing("full", full)
    ns.run()
    assert ns.result("prune")[0] == 0, ns.result("prune")[1]
    refused(*ns.result("run"), f"{full / 'cache' / 'generations.sqlite'}: database or disk is full: expected free "
                               "space under paths.cache_dir")
    paths = [p for p, _, _ in ns.files("full")]
    assert not any(".tmp-" in p or "generations.sqlite" in p for p in paths), paths
    assert not any(p.startswith(("cache/evaluate_base/", "cache/evaluate/")) for p in paths)
    listed = json.loads((run / "run.json").read_text())["stages"]
    assert sorted(listed) == ["dropmap", "profile", "prune"]
    assert sorted(p.name for p in run.iterdir() if p.is_symlink()) == sorted(listed)
