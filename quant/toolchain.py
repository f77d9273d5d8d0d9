"""The llama.cpp toolchain, built from the source PyPI ships (no downloaded binaries).

The `llama-cpp-python` sdist vendors llama.cpp with `convert_hf_to_gguf.py`, `gguf-py` and the
tools. On first use we fetch that sdist with pip (only the source: llama-cpp-python itself is not
installed, so llama.cpp is compiled once, here), build the tools the project runs with cmake on
every core and install the result under

    $MOEPRUNE_LLAMACPP_HOME (default ~/.cache/moeprune/llama.cpp)/<version>-<flags hash>/

The build runs in a temp dir beside its final place and is renamed into place only when complete,
under a file lock, so concurrent runs (parallel tests, sweep jobs) build it once and never see a
half-built tree. The tools share one `libllama.so` / `libggml*.so` (linked once, a smaller cache),
found through `$ORIGIN` RPATHs so the tree still works after the rename. `python -m
moeprune.quant.toolchain` builds it ahead of time (CI does, so the build is its own step).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moeprune import artifacts
from moeprune.errors import MoePruneError

log = logging.getLogger("moeprune")

VERSION = "0.3.36"  # llama-cpp-python release whose vendored llama.cpp we build
# What the project runs: quantize and imatrix (quant), llama-server (the llama_cpp backend) and
# llama-tokenize (imatrix's length check). Nothing else is compiled.
TOOLS = ("llama-quantize", "llama-imatrix", "llama-server", "llama-tokenize")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
    "-DBUILD_SHARED_LIBS=ON",
    # Relative RPATHs: the build is renamed from its temp dir into the cache after it finishes.
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
)
HOME_ENV = "MOEPRUNE_LLAMACPP_HOME"
SDIST_ENV = "MOEPRUNE_LLAMACPP_SDIST"  # a local llama_cpp_python-<version>.tar.gz (offline machines)
BUILD_INFO = "BUILD.json"


@dataclass(frozen=True)
class Toolchain:
    root: Path  # the installed tree: src/ (vendored llama.cpp) and bin/

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise MoePruneError(f"llama.cpp tool {name} is missing from {self.bin_dir}: expected one of {TOOLS}")
        return path

    @property
    def converter(self) -> Path:
        return self.src / "convert_hf_to_gguf.py"

    def python_env(self) -> dict[str, str]:
        """Environment for the converter: the vendored gguf-py first on PYTHONPATH (same version)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.src / "gguf-py"), *filter(None, [env.get("PYTHONPATH")])])
        return env


def home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "moeprune" / "llama.cpp").expanduser()


def build_id() -> str:
    return f"{VERSION}-{artifacts.hash_json(list(CMAKE_FLAGS) + list(TOOLS))[:8]}"


def cached() -> Toolchain | None:
    root = home() / build_id()
    return Toolchain(root) if (root / BUILD_INFO).is_file() else None


def ensure(jobs: int | None = None) -> Toolchain:
    """The built toolchain; builds it (minutes) on first use."""
    tc = cached()
    if tc:
        return tc
    base = home()
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{build_id()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent builder finishes first; then we reuse its tree
        tc = cached()
        if tc:
            return tc
        final = base / build_id()
        with artifacts.atomic_dir(final) as tmp:
            _build(tmp, fetch_sdist(base / "sdist"), jobs or max(1, os.cpu_count() or 1))
        return Toolchain(final)


def fetch_sdist(dest: Path) -> Path:
    """The llama-cpp-python sdist: $MOEPRUNE_LLAMACPP_SDIST, the cached copy, or `pip download`."""
    name = f"llama_cpp_python-{VERSION}.tar.gz"
    if os.environ.get(SDIST_ENV):
        path = Path(os.environ[SDIST_ENV]).expanduser()
        if not path.is_file() or path.name != name:
            raise MoePruneError(f"{SDIST_ENV}={path}: expected an existing file named {name}")
        return path
    if (dest / name).is_file():
        return dest / name
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={VERSION}", "-d", tmp], "pip download of the llama-cpp-python sdist")
        os.replace(Path(tmp) / name, dest / name)
    return dest / name


def check_sdist(path: Path, what: str) -> None:
    """A gzip tar holding the vendored llama.cpp (a broken download or a wrong file fails here, named,
    instead of inside tarfile or cmake)."""
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/convert_hf_to_gguf.py"
    try:
        with tarfile.open(path) as tar:
            if prefix not in tar.getnames():
                raise MoePruneError(f"{what}: the archive has no {prefix}: expected the llama-cpp-python "
                                    f"{VERSION} sdist")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise MoePruneError(f"{what} is not a readable sdist ({type(e).__name__}: {e}): expected the "
                            f"llama-cpp-python {VERSION} .tar.gz from PyPI") from None


def _build(out: Path, sdist: Path, jobs: int) -> None:
    log.info("building llama.cpp %s tools from %s into %s (minutes, once)", VERSION, sdist.name, out)
    check_sdist(sdist, str(sdist))
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and len(m.name) > len(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(out / "src", members=members, filter="data")
    src, build = out / "src", out / "build"
    _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], "cmake configure of llama.cpp")
    _run(["cmake", "--build", str(build), f"-j{jobs}", "--target", *TOOLS], "cmake build of llama.cpp")
    # Keep the binaries and shared libraries; drop the object files (hundreds of MB).
    os.replace(build / "bin", out / "bin")
    shutil.rmtree(build)
    shutil.rmtree(src / "models", ignore_errors=True)  # test vocabularies, 75 MB, unused
    missing = [t for t in TOOLS if not (out / "bin" / t).is_file()]
    if missing:
        raise MoePruneError(f"llama.cpp build finished without {missing}; expected all of {TOOLS}")
    artifacts.write_json(out / BUILD_INFO, {"llama_cpp_python": VERSION, "cmake_flags": list(CMAKE_FLAGS),
                                            "tools": list(TOOLS), "sdist": sdist.name})


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise MoePruneError(f"{what} failed (exit {proc.returncode}): {tail}")


if __name__ == "__main__":  # `python -m moeprune.quant.toolchain`: build (or find) the toolchain now
    logging.basicConfig(level=logging.INFO)
    print(ensure().root)
