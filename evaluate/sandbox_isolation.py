"""How a sandboxed program is isolated: the languages and their toolchains, the bubblewrap command
line (what the program sees is `sandbox_view.py`'s), and which isolation this host can give.
Running the program under it, with its limits, is `sandbox.py`'s."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.evaluate import sandbox_view

ISOLATIONS = ("bwrap", "none")

# Inside the sandbox: the program's writable working dir, the compiled build (read-only) and the
# call harness (read-only).
WORK, BUILD, HARNESS_DIR = "/tmp/work", "/build", "/harness"


@dataclass(frozen=True)
class Language:
    name: str
    source: str  # file the program is written to
    run: tuple[str, ...]  # {mem}: the memory limit in MB; {build}: the compiler's output dir
    compile: tuple[str, ...] = ()
    tool: str = ""  # the executable that must exist for this language
    limit_address_space: bool = True  # False: the runtime reserves far more than it uses; capped by a flag
    needs: tuple[str, ...] = ()  # files that must exist (libraries the dataset's programs import)


LANGUAGES = {
    "python": Language("python", "main.py", (sys.executable, "main.py"), tool=sys.executable),
    # V8 reserves large code ranges up front, so node gets a heap cap instead of an address-space one.
    "js": Language("js", "main.js", ("node", "--max-old-space-size={mem}", "main.js"), tool="node",
                   limit_address_space=False),
    "rust": Language("rust", "main.rs", ("{build}/main",), compile=("rustc", "--edition", "2021", "-o", "main", "main.rs"),
                     tool="rustc"),
    # MultiPL-E's Java prompts all import org.javatuples (Debian: libjavatuples-java); its tests are
    # `assert` statements, which the JVM skips unless -ea.
    "java": Language("java", "Problem.java", ("java", "-ea", "-XX:-UsePerfData", "-Xmx{mem}m", "-Xss64m",
                                              "-cp", "{build}:{cp}", "Problem"),
                     compile=("javac", "-cp", "{cp}", "Problem.java"), tool="javac", limit_address_space=False,
                     needs=("{cp}",)),
}


def java_classpath() -> str:
    return os.environ.get("MOEPRUNE_JAVA_CLASSPATH", "/usr/share/java/javatuples.jar")


def fill(args: tuple[str, ...], memory_mb: int, build: str = ".") -> list[str]:
    return [a.replace("{mem}", str(memory_mb)).replace("{cp}", java_classpath()).replace("{build}", build)
            for a in args]


def language(name: str) -> Language:
    if name not in LANGUAGES:
        raise MoePruneError(f"no sandbox runner for language {name!r}; expected one of {', '.join(LANGUAGES)}")
    return LANGUAGES[name]


def missing_toolchain(name: str) -> str | None:
    """Why this language cannot run here, or None when its toolchain is on PATH."""
    lang = language(name)
    tools = {lang.tool, lang.run[0], *lang.compile[:1]} - {"{build}/main", ""}
    missing = sorted(t for t in tools if not (Path(t).is_file() or shutil.which(t)))
    if missing:
        return f"{name}: {', '.join(missing)} not found on PATH"
    files = [f for f in fill(lang.needs, 0) if not all(Path(p).is_file() for p in f.split(":"))]
    return f"{name}: {', '.join(files)} not found (set MOEPRUNE_JAVA_CLASSPATH)" if files else None


# ---- isolation ------------------------------------------------------------------------------------
def bwrap_argv(tmpfs_bytes: int, work_files: dict[str, int], lang: Language, writable_build: Path | None = None,
               build: Path | None = None, harness: Path | None = None, info_fd: int | None = None,
               packages: tuple[str, ...] = ()) -> list[str]:
    """The bubblewrap command line, up to the program's own argv. `work_files` maps names in the
    working dir to open file descriptors whose content bwrap copies in (the copies count against the
    tmpfs size); `packages`: Python package dirs to show (only the tests' sandbox has any). The view
    and the uid are `sandbox_view`'s."""
    options, prefix = sandbox_view.identity_args()
    view = sandbox_view.system_view()
    argv = [shutil.which("bwrap") or "bwrap", *options, "--die-with-parent", "--new-session", *view.take()]
    # /dev read-only (its device nodes still work): /dev and /dev/shm are tmpfs that would take
    # writes past the one cap. /tmp, sized to it, is the only writable place.
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
             "--perms", "01777", "--size", str(tmpfs_bytes), "--tmpfs", "/tmp"]
    # After the private /tmp: an interpreter that lives under the host's /tmp (a venv in a clone
    # there) is bound on top of it, where a bind made before the tmpfs would be hidden.
    view.made.add("/tmp")
    dirs = sandbox_view.language_view(view, lang.name, writable_build is not None, java_classpath(), packages)
    sandbox_view.mask_private(view, dirs)
    argv += view.take()
    if writable_build is not None:  # the compiler's run: it writes its output to the host dir
        argv += ["--bind", str(writable_build), BUILD, "--chdir", BUILD]
    else:
        argv += ["--perms", "0777", "--dir", WORK, "--chdir", WORK]
        for name, fd in work_files.items():
            argv += ["--perms", "0644", "--file", str(fd), f"{WORK}/{name}"]
        if build is not None:
            argv += ["--ro-bind", str(build), BUILD]
    if harness is not None:
        argv += ["--perms", "0755", "--dir", HARNESS_DIR, "--ro-bind", str(harness), f"{HARNESS_DIR}/{harness.name}"]
    if info_fd is not None:  # bwrap reports the host pid of the namespace's init there
        argv += ["--info-fd", str(info_fd)]
    # The sandbox's root is a tmpfs bwrap builds: read-only too, so the sized /tmp is all there is to write.
    return argv + ["--remount-ro", "/", "--", *prefix]


@functools.lru_cache(maxsize=1)
def bwrap_problem() -> str | None:
    """None when bubblewrap can build the sandbox here, else why it cannot."""
    if not shutil.which("bwrap"):
        return "bubblewrap (bwrap) is not installed"
    if sandbox_view.as_root() and not shutil.which("setpriv"):
        return "setpriv (util-linux) is not installed: under root it drops the program to uid 65534"
    try:
        proc = subprocess.run([*bwrap_argv(1 << 20, {}, LANGUAGES["python"]), "true"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap did not run: {e}"
    if proc.returncode != 0:
        return f"bwrap cannot build a sandbox here: {proc.stderr.strip()[:300]}"
    return None


def require_isolation(isolation: str, accept_unsafe: bool = False) -> None:
    """Refuse to score generated code without the isolation asked for, or without isolation unless
    the user accepted that its passes are not to be trusted."""
    if isolation not in ISOLATIONS:
        raise MoePruneError(f"bench.sandbox.isolation={isolation!r}: expected bwrap (isolated, the default) "
                            "or none (no isolation: runs generated code as your user)")
    if isolation == "bwrap" and (why := bwrap_problem()):
        raise MoePruneError(f"bench.sandbox.isolation=bwrap: {why}. Install it (apt-get install bubblewrap) or set "
                            "bench.sandbox.isolation=none with bench.sandbox.accept_unsafe=true to run generated "
                            "code without isolation, as your user, able to read and write your files")
    if isolation == "none" and not accept_unsafe:
        raise MoePruneError("bench.sandbox.accept_unsafe=false with bench.sandbox.isolation=none: expected true to "
                            "score without isolation. The program then runs as your user: it can read and write "
                            "your files, reach your sockets and forge its own pass (docs/evaluation.md, threat model)")


@functools.lru_cache(maxsize=1)
def network_isolation() -> str:
    """For isolation=none: 'unshare' when commands can run in an empty network namespace, else
    'python-socket-block'."""
    if shutil.which("unshare"):
        try:
            if subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0:
                return "unshare"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "python-socket-block"
