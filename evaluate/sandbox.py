"""Run untrusted generated code: one subprocess per sample, with limits.

Every run gets a fresh temporary working directory, a wall-time limit (the whole process group is
killed when it expires), an address-space limit (RLIMIT_AS: an allocation past it fails inside the
program), an output cap (stdout/stderr go to files capped by RLIMIT_FSIZE, so a print loop dies of
SIGXFSZ instead of filling the disk or our memory), no core dumps, and no network.

Network isolation: `unshare -rn` (a new user + network namespace holding only a down loopback)
wraps the command where the kernel allows unprivileged namespaces. Where it does not, Python code
gets a best-effort block instead (a `sitecustomize` that makes every socket connect/bind raise);
other languages then run with the network reachable, and `network_isolation()` says so, which the
bench records in its summary.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoePruneError

_SOCKET_BLOCK = '''\
import socket
def _blocked(*a, **k):
    raise OSError(101, "network disabled by the moeprune sandbox")
socket.socket.connect = socket.socket.connect_ex = socket.socket.bind = _blocked
socket.create_connection = _blocked
'''


_COMPILE_FILE_BYTES = 1 << 30  # a compiler writes binaries far larger than the program's output cap


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    memory_mb: int = 1024
    output_bytes: int = 1 << 20
    compile_wall_s: float = 60.0


@dataclass(frozen=True)
class RunResult:
    status: str  # ok | failed | timeout | memory | output_limit | compile_error
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "ok"

    def why(self) -> str:
        """The status and the last line the program printed (usually the exception)."""
        tail = (self.stderr or self.stdout).strip().splitlines()
        return f"{self.status}: {tail[-1][:200]}" if tail else self.status


@dataclass(frozen=True)
class Language:
    name: str
    source: str  # file the program is written to
    run: tuple[str, ...]  # {mem} is replaced by the memory limit in MB
    compile: tuple[str, ...] = ()
    tool: str = ""  # the executable that must exist for this language
    limit_address_space: bool = True  # False: the runtime reserves far more than it uses; capped by a flag
    needs: tuple[str, ...] = ()  # files that must exist (libraries the dataset's programs import)


LANGUAGES = {
    "python": Language("python", "main.py", (sys.executable, "main.py"), tool=sys.executable),
    # V8 reserves large code ranges up front, so node gets a heap cap instead of an address-space one.
    "js": Language("js", "main.js", ("node", "--max-old-space-size={mem}", "main.js"), tool="node",
                   limit_address_space=False),
    "rust": Language("rust", "main.rs", ("./main",), compile=("rustc", "--edition", "2021", "-o", "main", "main.rs"),
                     tool="rustc"),
    # MultiPL-E's Java prompts all import org.javatuples (Debian: libjavatuples-java); its tests are
    # `assert` statements, which the JVM skips unless -ea.
    "java": Language("java", "Problem.java", ("java", "-ea", "-Xmx{mem}m", "-Xss64m", "-cp", ".:{cp}", "Problem"),
                     compile=("javac", "-cp", "{cp}", "Problem.java"), tool="javac", limit_address_space=False,
                     needs=("{cp}",)),
}


def java_classpath() -> str:
    return os.environ.get("MOEPRUNE_JAVA_CLASSPATH", "/usr/share/java/javatuples.jar")


def _fill(args: tuple[str, ...], memory_mb: int) -> list[str]:
    return [a.replace("{mem}", str(memory_mb)).replace("{cp}", java_classpath()) for a in args]


def language(name: str) -> Language:
    if name not in LANGUAGES:
        raise MoePruneError(f"no sandbox runner for language {name!r}; expected one of {', '.join(LANGUAGES)}")
    return LANGUAGES[name]


def missing_toolchain(name: str) -> str | None:
    """Why this language cannot run here, or None when its toolchain is on PATH."""
    lang = language(name)
    tools = {lang.tool, lang.run[0], *lang.compile[:1]} - {"./main", ""}
    missing = sorted(t for t in tools if not (Path(t).is_file() or shutil.which(t)))
    if missing:
        return f"{name}: {', '.join(missing)} not found on PATH"
    files = [f for f in _fill(lang.needs, 0) if not all(Path(p).is_file() for p in f.split(":"))]
    return f"{name}: {', '.join(files)} not found (set MOEPRUNE_JAVA_CLASSPATH)" if files else None


@functools.lru_cache(maxsize=1)
def network_isolation() -> str:
    """'unshare' when commands can run in an empty network namespace, else 'python-socket-block'."""
    if shutil.which("unshare"):
        try:
            if subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0:
                return "unshare"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "python-socket-block"


def _limiter(memory_mb: int | None, output_bytes: int, cpu_s: float):
    def apply():  # runs in the child between fork and exec
        if memory_mb:
            resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        cpu = int(cpu_s) + 1  # a backstop for the wall clock: CPU time can only be less
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))

    return apply


def _exec(argv: list[str], cwd: Path, logs: Path, stdin: str | None, wall_s: float, memory_mb: int | None,
          output_bytes: int, env: dict, file_bytes: int | None = None) -> RunResult:
    if network_isolation() == "unshare":
        argv = ["unshare", "-rn", *argv]
    out_path, err_path = logs / "stdout", logs / "stderr"
    t0 = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=out, stderr=err, env=env, start_new_session=True,
                                preexec_fn=_limiter(memory_mb, file_bytes or output_bytes, wall_s))
        timed_out = False
        try:
            proc.communicate(stdin.encode() if stdin is not None else None, timeout=wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: children the program forked too
            proc.wait()
        except BrokenPipeError:  # the program exited without reading its input
            proc.wait()
    wall = time.perf_counter() - t0
    stdout = out_path.read_bytes()[:output_bytes].decode(errors="replace")
    stderr = err_path.read_bytes()[:output_bytes].decode(errors="replace")
    rc = proc.returncode
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        status = "timeout"
    elif rc == -signal.SIGXFSZ or (rc != 0 and max(out_path.stat().st_size, err_path.stat().st_size) >= output_bytes):
        # Python ignores SIGXFSZ: its write fails with EFBIG instead, so a full file tells too.
        status = "output_limit"
    elif rc != 0 and ("MemoryError" in stderr or "memory allocation of" in stderr
                      or "OutOfMemoryError" in stderr or "heap out of memory" in stderr):
        status = "memory"
    else:
        status = "ok" if rc == 0 else "failed"
    return RunResult(status, rc, stdout, stderr, wall)


def run_program(source: str, lang: str = "python", stdin: str | None = None, limits: Limits = Limits(),
                extra_files: dict[str, str] | None = None) -> RunResult:
    """Write `source` into a fresh directory, compile it if the language needs it, run it once."""
    spec = language(lang)
    reason = missing_toolchain(lang)
    if reason:
        raise MoePruneError(f"cannot run generated code: {reason}")
    with tempfile.TemporaryDirectory(prefix="moeprune-sandbox-") as tmp:
        work, logs = Path(tmp) / "work", Path(tmp) / "logs"
        work.mkdir()
        logs.mkdir()
        (work / spec.source).write_text(source)
        for name, text in (extra_files or {}).items():
            (work / name).write_text(text)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        if network_isolation() != "unshare" and lang == "python":
            (logs / "sitecustomize.py").write_text(_SOCKET_BLOCK)
            env["PYTHONPATH"] = str(logs)
        mem = limits.memory_mb if spec.limit_address_space else None
        if spec.compile:
            # rustup's proxy finds its toolchain through the real HOME; the compiler runs no generated code.
            cenv = {**env, **{k: os.environ[k] for k in ("HOME", "RUSTUP_HOME", "CARGO_HOME") if k in os.environ}}
            res = _exec(_fill(spec.compile, limits.memory_mb), work, logs, None, limits.compile_wall_s, None, limits.output_bytes, cenv,
                        file_bytes=_COMPILE_FILE_BYTES)
            if not res.passed:
                return RunResult("compile_error", res.returncode, res.stdout, res.stderr, res.wall_s)
        argv = _fill(spec.run, limits.memory_mb)
        return _exec(argv, work, logs, stdin, limits.wall_s, mem, limits.output_bytes, env)
