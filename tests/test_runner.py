"""The stage runner on its own: keys, reuse, and input hashing done once per run."""

from __future__ import annotations

from omegaconf import OmegaConf

from moeprune import artifacts
from moeprune.runner import Runner, Stage


def _write(name):
    def fn(ctx):
        (ctx.out_dir / "out.txt").write_text(name)
        return {"name": name}
    return fn


def test_an_input_read_by_several_stages_is_hashed_once_per_run(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"x" * 1000)
    cfg = OmegaConf.create({"paths": {"cache_dir": str(tmp_path / "cache")}, "cache": {"refresh": False},
                            "knob": 1})
    stages = [Stage("a", _write("a"), ("knob",), external=lambda c: {"model": model}),
              Stage("b", _write("b"), ("knob",), inputs=("a",), external=lambda c: {"model": model})]
    calls = []
    real = artifacts.hash_path
    monkeypatch.setattr(artifacts, "hash_path", lambda p, full=False: calls.append(p) or real(p, full))
    (tmp_path / "run1").mkdir()
    first = Runner(cfg, stages, tmp_path / "run1").run()
    assert calls == [model] and not first["a"]["cached"] and not first["b"]["cached"]
    (model / "weights.bin").write_bytes(b"y" * 1000)  # a changed input is a new key in the next run
    (tmp_path / "run2").mkdir()
    second = Runner(cfg, stages, tmp_path / "run2").run()
    assert not second["a"]["cached"] and len(calls) == 2


def test_every_evaluating_stage_keys_on_the_empty_answer_threshold():
    """Its flags come from evaluate.empty_threshold: a cached result under another threshold is stale."""
    from moeprune.stages import EVALUATE_VIRTUAL, STAGES

    evaluating = [s for s in STAGES if s.name.startswith("evaluate")] + [EVALUATE_VIRTUAL]
    assert len(evaluating) == 4
    assert all("evaluate.empty_threshold" in s.config_keys for s in evaluating)


def test_artifact_dirs_keep_a_shared_cache_dirs_group_bit(tmp_path):
    import stat

    from moeprune import artifacts

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)  # setgid: new entries belong to the directory's group
    with artifacts.atomic_dir(shared / "artifact") as tmp:
        (tmp / "x").write_text("1")
    assert (shared / "artifact").stat().st_mode & stat.S_ISGID


def test_a_second_builder_waits_for_the_lock_holder(tmp_path):
    """The runner's per-artifact lock across processes: the second one waits, and says so."""
    import subprocess
    import sys
    import time

    from moeprune import artifacts

    lock = tmp_path / "locks" / "profile-abc.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom moeprune.artifacts import build_lock\n"
        f"with build_lock({str(lock)!r}) as waited:\n    print(waited, flush=True)\n    time.sleep(1.0)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "False"  # it took the free lock
    t0 = time.monotonic()
    with artifacts.build_lock(lock) as waited:
        assert waited and time.monotonic() - t0 > 0.3
    holder.wait(timeout=10)
    with artifacts.build_lock(lock) as waited:
        assert not waited
