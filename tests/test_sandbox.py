"""The code sandbox: limits are enforced and reported; the network is unreachable; HumanEval's own
canonical solutions all pass through it. The fake passes and escapes live in test_sandbox_attacks.py."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import sysconfig
import time

import pytest

from moeprune.errors import MoePruneError
from moeprune.evaluate import sandbox, sandbox_isolation
from moeprune.evaluate.benches.humaneval import HumanEval

TIGHT = sandbox.Limits(wall_s=2.0, memory_mb=256, output_bytes=64 << 10)


def test_a_normal_program_runs_in_a_fresh_directory():
    res = sandbox.run_program("import os\nprint(sorted(os.listdir('.')), input())", stdin="hi\n", limits=TIGHT)
    assert res.status == "ok" and res.stdout.strip() == "['main.py'] hi"



@pytest.mark.skipif(sandbox_isolation.bwrap_problem() is not None, reason="needs bubblewrap")
def test_an_interpreter_living_under_the_hosts_tmp_still_runs_inside(tmp_path):
    """A clone in /tmp with its venv there: the venv is bound over the private /tmp, not hidden by it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    script = ("import site, sys; site.addsitedir(sys.argv[1])\n"  # moeprune from this environment
              "from moeprune.evaluate import sandbox\n"
              "r = sandbox.run_program('import sys; print(sys.prefix)')\n"
              "print(r.status, r.stdout.strip(), r.stderr.strip())\n")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", script, sysconfig.get_paths()["purelib"]],
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[:2] == ["ok", str(venv)], out

def test_infinite_loop_is_killed_at_the_wall_time():
    t0 = time.perf_counter()
    res = sandbox.run_program("while True:\n    pass", limits=TIGHT)
    assert res.status == "timeout" and not res.passed
    assert time.perf_counter() - t0 < TIGHT.wall_s + 3


def test_forked_children_die_with_the_program():
    src = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nelse:\n    os.wait()"
    t0 = time.perf_counter()
    assert sandbox.run_program(src, limits=TIGHT).status == "timeout"
    assert time.perf_counter() - t0 < TIGHT.wall_s + 3


def test_memory_hog_is_stopped_by_the_address_space_limit():
    res = sandbox.run_program("x = bytearray(2 << 30)\nprint('allocated')", limits=TIGHT)
    assert res.status == "memory" and "allocated" not in res.stdout


def test_output_flood_is_capped():
    res = sandbox.run_program("while True:\n    print('x' * 1000)", limits=TIGHT)
    assert res.status == "output_limit" and len(res.stdout) <= TIGHT.output_bytes


def test_network_is_unreachable():
    src = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\nprint('connected')"
    res = sandbox.run_program(src, limits=TIGHT)
    assert res.status == "failed" and "connected" not in res.stdout
    assert "OSError" in res.stderr or "unreachable" in res.stderr.lower()


def test_without_isolation_the_socket_block_fallback_still_stops_python(monkeypatch):
    sandbox_isolation.network_isolation.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name == "unshare" else "/usr/bin/" + name)
    try:
        assert sandbox_isolation.network_isolation() == "python-socket-block"
        res = sandbox.run_program("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)",
                                  limits=dataclasses.replace(TIGHT, isolation="none", accept_unsafe=True))
        assert res.status == "failed" and "network disabled by the moeprune sandbox" in res.stderr
    finally:
        sandbox_isolation.network_isolation.cache_clear()


def test_unknown_language_and_missing_toolchain_fail_clearly(monkeypatch):
    with pytest.raises(MoePruneError, match="no sandbox runner for language 'cobol'"):
        sandbox.run_program("x", "cobol")
    monkeypatch.setitem(sandbox_isolation.LANGUAGES, "js", sandbox_isolation.Language(
        "js", "main.js", ("no-such-node", "main.js"), tool="no-such-node"))
    assert "no-such-node not found" in sandbox_isolation.missing_toolchain("js")
    with pytest.raises(MoePruneError, match="cannot run generated code: js: no-such-node not found"):
        sandbox.run_program("console.log(1)", "js")


def test_compile_errors_are_reported_as_such():
    if sandbox_isolation.missing_toolchain("rust"):
        pytest.skip(sandbox_isolation.missing_toolchain("rust"))
    assert sandbox.run_program("fn main() { let x: i32 = \"no\"; }", "rust").status == "compile_error"


def test_all_164_humaneval_canonical_solutions_pass():
    bench = HumanEval()
    samples = bench.samples()
    verdicts = bench.score_all(samples, [bench.canonical(s) for s in samples])
    assert len(samples) == 164
    assert [s.id for s, v in zip(samples, verdicts) if not v.passed] == []
