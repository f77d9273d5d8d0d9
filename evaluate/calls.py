"""Checked runs: the pass of a Python program is decided outside it.

The program runs in one sandbox as a module that answers calls (`call_harness.serve`); the
dataset's tests run in a second sandbox (`call_harness.check`) where each function they call is a
stub forwarding the call and decoding the reply as plain data. The outcome reaches the scorer on a
pipe only the tests' sandbox holds. The program's exit status and output are never read as a pass:
exiting, hooking exit, patching the interpreter or returning an object whose `__eq__` always holds
all end as a fail. The two sandboxes share only the two pipes of the call protocol. The program's
sandbox holds the standard library only; the tests' also the third-party packages the tests import.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from moeprune.evaluate.sandbox import Limits, RunResult, Sandbox
from moeprune.evaluate.sandbox_isolation import HARNESS_DIR

HARNESS = Path(__file__).resolve().parent / "call_harness.py"


@dataclass(frozen=True)
class Tests:
    """What the tests' sandbox runs: `setup` (trusted dataset code: imports, the prompt's helpers),
    then `test` with each of `names` bound to a stub calling into the program. `vars` are plain
    values the test reads (a test case's input and expected output)."""
    setup: str
    test: str
    names: tuple[str, ...]
    vars: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Checked:
    passed: bool
    why: str  # "" on a pass
    program: RunResult  # the program's own run: stdout, stderr, status (timeout, memory...)


def _harness_path(box: Sandbox) -> str:
    return f"{HARNESS_DIR}/{HARNESS.name}" if box.limits.isolation == "bwrap" else str(HARNESS)


def tests_packages(tests: Tests) -> tuple[str, ...]:
    """Where the third-party packages the tests import live here (HumanEval+'s numpy), with the
    libraries their wheels vendor: the tests' sandbox sees these, the program's the stdlib only."""
    names: set[str] = set()
    for code in (tests.setup, tests.test):
        try:
            tree = ast.parse(code)
        except SyntaxError:  # the tests' sandbox reports it as the tests' own failure
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    found: list[str] = []
    for name in sorted(names - set(sys.stdlib_module_names)):
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue  # not installed: the tests fail on the import, as they would here
        if spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                found += [loc] + [str(libs) for libs in [Path(loc).with_name(f"{name}.libs")] if libs.is_dir()]
        elif spec.origin and os.path.isfile(spec.origin):
            found.append(spec.origin)
    return tuple(found)


def run_checked(program: str, tests: Tests, limits: Limits = Limits()) -> Checked:
    with Sandbox("python", limits) as prog, Sandbox("python", limits, tests_packages(tests)) as chk:
        prog.write(program)
        chk.write("", {"tests.json": json.dumps({"setup": tests.setup, "test": tests.test,
                                                 "names": list(tests.names), "vars": tests.vars})})
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            served = prog.box.start([sys.executable, "-I", _harness_path(prog), "serve", "main.py", str(req_r),
                                     str(rep_w)], "run", pass_fds=(req_r, rep_w), harness=HARNESS)
            checking = chk.box.start([sys.executable, "-I", _harness_path(chk), "check", "tests.json", str(req_w),
                                      str(rep_r), str(out_w)], "check", pass_fds=(rep_r, req_w, out_w),
                                     harness=HARNESS)
        finally:
            for fd in (req_r, req_w, rep_r, rep_w, out_w):
                os.close(fd)
        with os.fdopen(out_r, "rb") as outcome_pipe:
            timed_out = False
            try:
                checking.proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            checking.kill()
            served.kill()
            outcome = outcome_pipe.read(1 << 16)
        ran = served.result(timed_out, limits.output_bytes)
        if timed_out:
            return Checked(False, ran.why() if ran.status == "timeout" else "timeout", ran)
        return _verdict(outcome, ran, checking.result(False, limits.output_bytes))


def _verdict(outcome: bytes, ran: RunResult, tests_run: RunResult) -> Checked:
    try:
        report = json.loads(outcome)
    except json.JSONDecodeError:
        # The tests' sandbox died without a report: its own limits, or a broken dataset test.
        return Checked(False, f"the tests did not finish: {tests_run.why()}", ran)
    if report.get("status") == "pass":
        return Checked(True, "", ran)
    why = str(report.get("why", "failed"))
    if report.get("exited"):
        why += f" ({ran.why()})" if ran.status != "ok" else " (it exited with status 0)"
    return Checked(False, why, ran)


def called_names(test: str, setup: str = "") -> tuple[str, ...]:
    """The names the tests use but neither define nor import nor get from Python: the program's
    functions. Builtins stay the tests' own, so a program defining `set` cannot stand in for it."""
    used, bound = set(), set(dir(builtins))
    for code in (setup, test):
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Name):
                (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
    return tuple(sorted(used - bound))
