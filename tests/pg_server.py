"""A throwaway PostgreSQL server for the shared-study tests: initdb into a temp dir, listen on a free
localhost port with trust auth, stopped (and its dir removed) at the end. initdb refuses to run as
root, so as root the cluster belongs to `nobody`."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional


def bindir() -> Optional[Path]:
    """Where initdb and pg_ctl are: Debian's /usr/lib/postgresql/<major>/bin (newest), else PATH."""
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]), reverse=True):
        return Path(found).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server() -> Iterator[str]:
    """Yield the SQLAlchemy URL of a fresh server's `postgres` database."""
    bin_ = bindir()
    assert bin_ is not None, "no initdb: install Debian's postgresql package (.ci/run does)"
    # Under /tmp itself: pytest's tmp dirs are 0700 root, which `nobody` cannot enter.
    root = Path(tempfile.mkdtemp(prefix="moeprune-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    data, port, log = root / "data", _free_port(), root / "server.log"
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, cwd=root)  # noqa: E731
    try:
        run(str(bin_ / "initdb"), "-D", str(data), "-A", "trust", "-U", "moeprune", "--no-sync")
        run(str(bin_ / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start",
            "-o", f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off")
        try:
            yield f"postgresql://moeprune@127.0.0.1:{port}/postgres"
        finally:
            run(str(bin_ / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
