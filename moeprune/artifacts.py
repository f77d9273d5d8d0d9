"""Artifact directories: content hashes, manifests and atomic writes.

Every stage writes one directory. It is built under a temporary name next to its final place and
renamed only when complete, so a crash never leaves a half-written artifact that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# Files above this size are fingerprinted by (size, head, tail) instead of read whole: hashing a
# 50 GB checkpoint on every run would cost minutes. A change inside a big file that keeps its size,
# head and tail would go unnoticed; `cache.verify_large_files=true` hashes them whole.
FULL_HASH_LIMIT = 64 << 20
_EDGE = 1 << 20


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# tempfile makes private files (0600) and dirs (0700); a renamed artifact keeps that mode, and a
# pruned checkpoint another user or a serving container cannot read is no use: give temps the
# modes a plain open()/mkdir() would
_UMASK = _current_umask()


def mkstemp(final: Path, suffix: str = "") -> tuple[int, str]:
    """tempfile.mkstemp beside `final` (same filesystem, so os.replace is atomic), with the umask's mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(final).name}.", suffix=suffix, dir=Path(final).parent)
    os.chmod(tmp, 0o666 & ~_UMASK)
    return fd, tmp


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(obj: Any) -> str:
    return hash_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def hash_file(path: Path, full: bool = False) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if full or size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        else:
            h.update(f"size={size}".encode())
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()


def hash_path(path: Path, full: bool = False) -> str:
    """Hash a file, or a directory as the sorted list of (relative name, file hash)."""
    path = Path(path)
    if path.is_file():
        return hash_file(path, full)
    entries = []
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            entries.append((p.relative_to(path).as_posix(), hash_file(p, full)))
    return hash_json(entries)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: temp file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside `final`; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    created = not final.parent.exists()
    while True:
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
            break
        except FileNotFoundError:  # another builder's failure removed the dir it had created: again
            created = True
    os.chmod(tmp, (0o777 & ~_UMASK) | (tmp.stat().st_mode & stat.S_ISGID))  # keep a shared cache's group bit
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:  # a failed build leaves no empty <cache>/<stage>/ behind; one in use is not empty
            with contextlib.suppress(OSError):
                final.parent.rmdir()
        raise


@contextlib.contextmanager
def _locked(lock_path: Path, wait: bool) -> Iterator[bool | None]:
    """An exclusive flock on `lock_path`, whose file is removed on release so lock files do not pile
    up in the cache. Yields whether it had to wait, or None (wait=False) where another holds it.
    A waiter that got the lock on a file its holder just unlinked starts again on the path's new
    file: two processes never hold locks on different files of one name."""
    import fcntl

    lock_path = Path(lock_path)
    waited = False
    while True:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield None
                    return
                fcntl.flock(f, fcntl.LOCK_EX)
                waited = True
            try:
                current = os.stat(lock_path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(f.fileno()).st_ino:
                continue  # the previous holder removed this file as we waited on it
            try:
                yield waited
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)  # while still held: a waiter on it sees the unlink and retries
            return
        finally:
            f.close()  # closing drops the flock


@contextlib.contextmanager
def build_lock(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on `lock_path` across the processes of one host; yields whether it had
    to wait for another holder. The OS drops the lock if its holder dies; the file goes on release."""
    with _locked(lock_path, wait=True) as waited:
        yield bool(waited)


def writable(path: Path) -> bool:
    """Whether `path` (a dir, or where one would be created) can take new files."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or would, once created)."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


_FULL = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "database or disk is full")


def out_of_space(e: BaseException | None) -> bool:
    """Whether `e`, or what it was raised from, is a full disk or quota: an OSError, or a library's
    own error carrying the OS message (safetensors' SafetensorError "No space left on device (os
    error 28)", sqlite's "database or disk is full")."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(e) for m in _FULL):
            return True
        e = e.__cause__ or e.__context__
    return False


def remove_dead_temps(cache_dir: Path, stages, lock_path) -> list[Path]:
    """Remove the temp dirs (`<stage>/.<key>.tmp-*`) that builders killed outright (SIGKILL, a lost
    machine) left in the cache. A builder holds its stage's lock (`lock_path(stage, key)`) for as
    long as its temp dir exists, so a temp whose lock can be taken has no live builder; one whose
    lock is held is left alone."""
    removed = []
    for stage in stages:
        for tmp in sorted(Path(cache_dir, stage).glob(".*.tmp-*")):
            key = tmp.name[1:].rsplit(".tmp-", 1)[0]
            lock = Path(lock_path(stage, key))
            if not tmp.is_dir() or not writable(lock.parent) or not os.access(tmp.parent, os.W_OK):
                continue  # a read-only cache: nothing can be removed, nothing will be built
            with _locked(lock, wait=False) as free:
                if free is None:
                    continue  # a live builder's
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
                log.warning("removed %s: the temp dir of a %s build whose process died", tmp, stage)
    return removed


def package_versions(names=("moeprune", "torch", "transformers", "safetensors", "hydra-core", "numpy")) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
