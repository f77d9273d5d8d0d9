"""Run untrusted generated code: one sandbox per program, with limits.

With `isolation: bwrap` (the default) every program runs under bubblewrap: a read-only view of the
system directories and what its language needs (`sandbox_view.py`: no Python package, no answer
key, no home, /run, /var or host /tmp: no host Unix sockets), a private tmpfs at /tmp as the only
writable place (its size caps the bytes written across all files; /dev is read-only), empty pid,
network, IPC and UTS namespaces, no capabilities, uid 65534 (a real unprivileged uid under root, so
root-only files stay unreadable), and `--die-with-parent`: when the scorer kills the sandbox on timeout, or dies itself,
the pid namespace ends and every process the program forked ends with it. Rlimits as well: CPU time
(a backstop for the wall clock), address space, file size, open files, processes.

`isolation: none` runs the program as a plain subprocess of the scorer (rlimits, its own process
group, an empty network namespace where `unshare -rn` works, else a Python-only socket block). It
is an explicit opt-out for hosts without bubblewrap that also needs `accept_unsafe: true`: the
program can then reach the scorer's files and processes, so a pass is only as honest as the model.

The program's exit status alone never decides a pass: see `evaluate/calls.py` for how Python
benches decide it outside the program, and the benches for the rest. This module runs a program
with its limits; the isolation it runs under (languages, bwrap's argv, what the host offers) is
`sandbox_isolation.py`'s.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.evaluate import sandbox_view
from moeprune.evaluate.sandbox_isolation import (
    BUILD, WORK, Language, bwrap_argv, fill, language, missing_toolchain, network_isolation, require_isolation)

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
    output_bytes: int = 1 << 20  # per stdout/stderr, and the tmpfs size: all files written, together
    compile_wall_s: float = 60.0
    open_files: int = 256
    processes: int = 4096  # RLIMIT_NPROC counts the host user's processes (and root is exempt): a backstop
    isolation: str = "bwrap"
    accept_unsafe: bool = False  # isolation=none scores only with it: the program can forge its own pass


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


def isolation_record(limits: Limits) -> dict:
    """What a bench's summary records about how its programs were isolated."""
    if limits.isolation == "bwrap":
        return {"isolation": "bwrap", "network_isolation": "bwrap (empty network namespace)"}
    return {"isolation": "none", "network_isolation": network_isolation()}


# ---- running ----------------------------------------------------------------------------------------
def _limiter(memory_mb: int | None, file_bytes: int, cpu_s: float, limits: Limits):
    def apply():  # runs in the child between fork and exec; bwrap and the program inherit them
        if memory_mb:
            resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        cpu = int(cpu_s) + 1  # a backstop for the wall clock: CPU time can only be less
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))

    return apply


@dataclass
class Box:
    """One prepared sandbox directory on the host: the program's files, its logs, its build."""
    root: Path
    lang: Language
    limits: Limits
    packages: tuple[str, ...] = ()  # Python package dirs in view: for the trusted tests' sandbox only

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def env(self) -> dict:
        home = WORK if self.limits.isolation == "bwrap" else str(self.work)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        if self.limits.isolation == "none" and network_isolation() != "unshare":
            (self.logs / "sitecustomize.py").write_text(_SOCKET_BLOCK)
            env["PYTHONPATH"] = str(self.logs)
        return env

    def start(self, argv: list[str], tag: str, *, stdin: bool = False, pass_fds: tuple[int, ...] = (),
              harness: Path | None = None, compiling: bool = False) -> "Launched":
        """Start `argv` in the sandbox (not waiting for it). Paths in argv are as the program sees them."""
        lim = self.limits
        mem = lim.memory_mb if self.lang.limit_address_space and not compiling else None
        file_bytes = _COMPILE_FILE_BYTES if compiling else lim.output_bytes
        env = self.env()
        if compiling:
            env.update({k: os.environ[k] for k in ("HOME", "RUSTUP_HOME", "CARGO_HOME") if k in os.environ})
        fds: dict[str, int] = {}
        info_r = info_w = None
        if lim.isolation == "bwrap":
            if not compiling:
                fds = {p.name: os.open(p, os.O_RDONLY) for p in sorted(self.work.iterdir())}
            info_r, info_w = os.pipe()
            fds[""] = info_w
            sizes = sum(p.stat().st_size + 4096 for p in self.work.iterdir())
            tmpfs = _COMPILE_FILE_BYTES if compiling else lim.output_bytes + sizes
            build = self.build if any(self.build.iterdir()) else None
            files = {k: v for k, v in fds.items() if k}
            if compiling and sandbox_view.as_root():  # the compiler runs as uid 65534 too
                os.chown(self.build, sandbox_view.SANDBOX_UID, sandbox_view.SANDBOX_UID)
            argv = [*bwrap_argv(tmpfs, files, self.lang, self.build if compiling else None, build, harness, info_w,
                                self.packages), *argv]
            cwd = self.root
        else:
            cwd = self.build if compiling else self.work
            if network_isolation() == "unshare":
                argv = ["unshare", "-rn", *argv]
        out, err = open(self.logs / f"{tag}.stdout", "wb"), open(self.logs / f"{tag}.stderr", "wb")
        try:
            proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                    stdout=out, stderr=err, env=env, start_new_session=True,
                                    pass_fds=(*pass_fds, *fds.values()),
                                    preexec_fn=_limiter(mem, file_bytes, lim.compile_wall_s if compiling else lim.wall_s, lim))
        finally:
            out.close()
            err.close()
            for fd in fds.values():
                os.close(fd)
        init_pid = _read_init_pid(info_r) if info_r is not None else None
        return Launched(proc, self.logs / f"{tag}.stdout", self.logs / f"{tag}.stderr", time.perf_counter(), init_pid)

    def path(self, kind: str) -> str:
        """Where the program sees its working dir ('work') or the build ('build')."""
        if self.limits.isolation == "bwrap":
            return WORK if kind == "work" else BUILD
        return str(self.work if kind == "work" else self.build)


def _read_init_pid(fd: int) -> int | None:
    """The `child-pid` bwrap writes to its info fd (None when it failed before starting one)."""
    data = b""
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read1(4096):
            data += chunk
            try:
                return int(json.loads(data)["child-pid"])
            except (ValueError, KeyError):
                continue
    return None


@dataclass
class Launched:
    proc: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    t0: float
    init_pid: int | None = None  # under bwrap: the host pid of the pid namespace's init

    def kill(self) -> None:
        """Kill the sandbox and wait until nothing in it is left. Under bwrap the namespace's init is
        killed first: the kernel then kills every process in the namespace, and the init is not
        reaped (so bwrap does not exit) before they are all gone. Without bwrap, the process group."""
        if self.init_pid is not None and self.proc.poll() is None:
            try:
                os.kill(self.init_pid, signal.SIGKILL)
                self.proc.wait(timeout=10)  # bwrap exits once it has reaped the init: the namespace is empty
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def finish(self, wall_s: float, output_bytes: int, stdin: str | None = None) -> RunResult:
        timed_out = False
        try:
            self.proc.communicate(stdin.encode() if stdin is not None else None,
                                  timeout=max(0.0, wall_s - (time.perf_counter() - self.t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
        except BrokenPipeError:  # the program exited without reading its input
            self.proc.wait()
        self.kill()  # also after a normal exit: nothing the program started outlives it
        return self.result(timed_out, output_bytes)

    def result(self, timed_out: bool, output_bytes: int) -> RunResult:
        wall = time.perf_counter() - self.t0
        stdout = self.stdout_path.read_bytes()[:output_bytes].decode(errors="replace")
        stderr = self.stderr_path.read_bytes()[:output_bytes].decode(errors="replace")
        rc = self.proc.returncode
        full = max(self.stdout_path.stat().st_size, self.stderr_path.stat().st_size) >= output_bytes
        if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL):
            status = "timeout"
        elif rc in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or (rc != 0 and full):
            # Python ignores SIGXFSZ: its write fails with EFBIG instead, so a full file tells too.
            status = "output_limit"
        elif rc != 0 and ("MemoryError" in stderr or "memory allocation of" in stderr
                          or "OutOfMemoryError" in stderr or "heap out of memory" in stderr):
            status = "memory"
        else:
            status = "ok" if rc == 0 else "failed"
        return RunResult(status, rc, stdout, stderr, wall)


class Sandbox:
    """A host temp dir for one program: write its files, compile it if its language needs it, then
    start it (or several processes over it) under the configured isolation."""

    def __init__(self, lang: str, limits: Limits, packages: tuple[str, ...] = ()):
        self.lang = language(lang)
        reason = missing_toolchain(lang)
        if reason:
            raise MoePruneError(f"cannot run generated code: {reason}")
        require_isolation(limits.isolation, limits.accept_unsafe)
        self.limits = limits
        self._tmp = tempfile.TemporaryDirectory(prefix="moeprune-sandbox-")
        self.box = Box(Path(self._tmp.name), self.lang, limits, packages)
        for d in (self.box.work, self.box.build, self.box.logs):
            d.mkdir()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def write(self, source: str, extra_files: dict[str, str] | None = None) -> None:
        (self.box.work / self.lang.source).write_text(source)
        for name, text in (extra_files or {}).items():
            (self.box.work / name).write_text(text)

    def compile(self) -> RunResult | None:
        """Compile the program into the build dir; the failed compiler's result, or None."""
        if not self.lang.compile:
            return None
        shutil.copy(self.box.work / self.lang.source, self.box.build / self.lang.source)
        (self.box.work / self.lang.source).unlink()  # only the build goes into the program's sandbox
        argv = fill(self.lang.compile, self.limits.memory_mb, self.box.path("build"))
        res = self.box.start(argv, "compile", compiling=True).finish(self.limits.compile_wall_s, self.limits.output_bytes)
        if not res.passed:
            return RunResult("compile_error", res.returncode, res.stdout, res.stderr, res.wall_s)
        return None

    def run_argv(self) -> list[str]:
        return fill(self.lang.run, self.limits.memory_mb, self.box.path("build"))


def run_program(source: str, lang: str = "python", stdin: str | None = None, limits: Limits = Limits(),
                extra_files: dict[str, str] | None = None) -> RunResult:
    """Write `source` into a fresh sandbox, compile it if the language needs it, run it once."""
    with Sandbox(lang, limits) as box:
        box.write(source, extra_files)
        failed = box.compile()
        if failed:
            return failed
        launched = box.box.start(box.run_argv(), "run", stdin=stdin is not None)
        return launched.finish(limits.wall_s, limits.output_bytes, stdin)
