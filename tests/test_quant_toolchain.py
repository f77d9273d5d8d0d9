"""The llama.cpp toolchain cache: one build under a lock, installed atomically, nothing half-built.

The compile itself is stubbed here (it takes minutes); the llamacpp-marked tests run the real one.
"""

from __future__ import annotations

import threading
import time

import pytest

from moeprune.errors import MoePruneError
from moeprune.quant import toolchain


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(toolchain.HOME_ENV, str(tmp_path / "tc"))
    sdist = tmp_path / f"llama_cpp_python-{toolchain.VERSION}.tar.gz"
    sdist.write_bytes(b"not used: _build is stubbed")
    monkeypatch.setenv(toolchain.SDIST_ENV, str(sdist))
    return tmp_path / "tc"


def test_concurrent_first_use_builds_once(home, monkeypatch):
    calls = []

    def fake_build(out, sdist, jobs):
        calls.append(out)
        time.sleep(0.3)  # the other thread arrives while this build is in progress
        (out / "bin").mkdir()
        for t in toolchain.TOOLS:
            (out / "bin" / t).write_text("#!/bin/sh\n")
        (out / toolchain.BUILD_INFO).write_text("{}")

    monkeypatch.setattr(toolchain, "_build", fake_build)
    assert toolchain.cached() is None
    roots = []
    threads = [threading.Thread(target=lambda: roots.append(toolchain.ensure(jobs=1).root)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(roots)) == 1
    assert roots[0] == home / toolchain.build_id() and not calls[0].exists()  # built in a temp dir, renamed
    assert toolchain.cached().tool("llama-quantize").is_file()


def test_failed_build_leaves_nothing_that_looks_built(home, monkeypatch):
    def broken_build(out, sdist, jobs):
        (out / "bin").mkdir()
        raise MoePruneError("cmake build of llama.cpp failed (exit 2): error: ...")

    monkeypatch.setattr(toolchain, "_build", broken_build)
    with pytest.raises(MoePruneError, match="cmake build of llama.cpp failed"):
        toolchain.ensure()
    assert toolchain.cached() is None
    assert [p.name for p in home.iterdir() if not p.name.endswith(".lock")] == []


def test_bad_sdist_override_and_missing_tool(home, tmp_path, monkeypatch):
    monkeypatch.setenv(toolchain.SDIST_ENV, str(tmp_path / "llama.tar.gz"))
    with pytest.raises(MoePruneError, match=f"expected an existing file named llama_cpp_python-{toolchain.VERSION}"):
        toolchain.fetch_sdist(tmp_path)
    with pytest.raises(MoePruneError, match="llama-cli is missing"):
        toolchain.Toolchain(tmp_path).tool("llama-cli")


def test_build_id_follows_the_flags(monkeypatch):
    before = toolchain.build_id()
    assert before.startswith(toolchain.VERSION + "-")
    monkeypatch.setattr(toolchain, "CMAKE_FLAGS", (*toolchain.CMAKE_FLAGS, "-DGGML_CUDA=ON"))
    assert toolchain.build_id() != before


def test_the_build_compiles_exactly_the_tools_the_code_runs():
    import re
    from pathlib import Path

    root = Path(toolchain.__file__).resolve().parents[1]
    sources = [p for d in ("quant", "evaluate", "moeprune") for p in (root / d).rglob("*.py")]
    used = {m for p in sources for m in re.findall(r"""\.tool\(["'](llama-[\w-]+)["']\)""", p.read_text())}
    assert used == set(toolchain.TOOLS)


def test_build_id_follows_the_targets(monkeypatch):
    before = toolchain.build_id()
    monkeypatch.setattr(toolchain, "TOOLS", (*toolchain.TOOLS, "llama-cli"))
    assert toolchain.build_id() != before
