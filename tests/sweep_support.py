"""Helpers shared by the sweep and tracking tests: the model they sweep, the CLI in a subprocess,
and a reader for W&B's offline run log (the `.wandb` file `wandb sync` uploads)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

TOY_MODEL = Path(__file__).resolve().parents[1] / "moeprune" / "toy" / "model"
# Small enough for 2 CPU cores: a few calibration prompts and 2 test tasks per class.
SMALL = ["calibration.samples_per_class=4", "bench.n_per_class=2", "backend.batch_size=32"]


@pytest.fixture(scope="session")
def sweep_model(tmp_path_factory) -> Path:
    """The trained toy model once it is shipped, else a tiny random Gemma 4 (scores ~0: the
    mechanics are the same)."""
    from conftest import save_tiny_gemma4

    if (TOY_MODEL / "model.safetensors").exists():
        return TOY_MODEL
    return save_tiny_gemma4(tmp_path_factory.mktemp("model") / "tiny_gemma4")


@pytest.fixture(scope="session")
def sweep_cache(tmp_path_factory) -> Path:
    """One stage cache for every sweep test: the profile is computed once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def study(sweep_model, sweep_cache, tmp_path_factory) -> dict:
    """A 6-trial toy_recipe study in sqlite with logger=wandb, then the same command again."""
    import optuna

    root = tmp_path_factory.mktemp("study")
    fixed = [f"model.path={sweep_model}", *SMALL]
    command = ["-m", "hparams_search=toy_recipe", *fixed, "logger=wandb", "hydra.sweeper.n_trials=6",
               f"hydra.sweeper.storage=sqlite:///{root}/studies/toy.db", f"hydra.sweep.dir={root}/sweep"]
    moeprune(command, root, sweep_cache)
    n_first = len(optuna.load_study(study_name="toy_recipe", storage=f"sqlite:///{root}/studies/toy.db").trials)
    moeprune(command, root, sweep_cache)
    return {"root": root, "fixed": fixed, "n_first": n_first}


def moeprune(args: list[str], cwd: Path, cache: Path, extra_env: dict | None = None, check: bool = True):
    env = {**os.environ, "MOEPRUNE_CACHE": str(cache), "HYDRA_FULL_ERROR": "0", **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-m", "moeprune", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"moeprune failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def trial_records(sweep_dir: Path) -> dict[int, dict]:
    recs = [json.loads(p.read_text()) | {"dir": p.parent} for p in Path(sweep_dir).rglob("optuna_trial.json")]
    return {r["number"]: r for r in recs}


def wandb_records(run_dir: Path) -> list:
    """Every record of a W&B offline run: the log is LevelDB-style 32 KiB blocks of chunks
    (crc32, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte ':W&B' header; each record is a
    wandb_internal_pb2.Record protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = Path(run_dir).glob("run-*.wandb")
    data, block, pos, parts, raw = log.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", log
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            raw.append(chunk)
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            raw.append(parts + chunk)
    records = []
    for r in raw:
        rec = pb.Record()
        rec.ParseFromString(r)
        records.append(rec)
    return records


def wandb_run(run_dir: Path) -> dict:
    """The parts of an offline run the tests check: run name/group, config, logged keys, files."""
    out = {"config": {}, "history": {}, "artifacts": []}
    for rec in wandb_records(run_dir):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["group"] = rec.run.display_name, rec.run.run_group
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                out["history"][key] = json.loads(item.value_json)
        elif kind == "artifact":
            out["artifacts"].append((rec.artifact.type, sorted(c.path for c in rec.artifact.manifest.contents)))
    return out
