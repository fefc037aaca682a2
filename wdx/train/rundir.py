"""Who owns a run directory: one run at a time, and a crashed owner's claim expires.

Two runs started with the same --run-name would interleave metrics.jsonl and overwrite each
other's checkpoints and final/. The main process of a run holds RUN/.lock (host, pid and the
process's start time, as JSON) from start-up to exit. Another run refuses to start while
the owner lives; a lock whose process is gone (SIGKILL, a crashed node) is replaced with a
warning. A lock from another host cannot be checked and is never replaced silently.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunDirError(ValueError):
    """The run directory cannot be used (one line, names it)."""


def check_output_dir(output_dir: str) -> None:
    """--output-dir must be (or become) a writable directory: say so before any work."""
    path = Path(output_dir)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise RunDirError(f"--output-dir {output_dir}: {existing} is a file, not a directory")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"--output-dir {output_dir}: {existing} is not writable by this user")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None: tells a live owner
    from a new process that got its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has finished


def _alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    start = _start_time(pid)
    if start is not None:
        return owner.get("start") in (None, start)
    if Path("/proc").is_dir():
        return False  # no such process, or a zombie
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def acquire(run_dir: str | Path, run_name: str) -> Path:
    """Take RUN/.lock for this process, replacing a dead owner's; raise RunDirError if a live run holds it.

    The lock is written whole to a private file and hard-linked into place: the link is
    atomic and fails if a lock exists, so nobody ever reads a half-written one.
    """
    lock = Path(run_dir) / LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = _me()
    mine = lock.with_name(f"{LOCK_FILE}.{me['pid']}")
    mine.write_text(json.dumps(me))
    try:
        for _ in range(3):
            try:
                os.link(mine, lock)
                return lock
            except FileExistsError:
                owner = _read(lock)
            if owner == me:
                return lock  # this process already holds it (an in-process rerun)
            if owner and owner.get("host") != me["host"]:
                raise RunDirError(f"--run-name {run_name}: {run_dir} is in use by pid {owner.get('pid')} on host "
                                  f"{owner.get('host')}; if that run is gone, delete {lock}")
            if owner and _alive(owner):
                raise RunDirError(f"--run-name {run_name}: {run_dir} is in use by a running process (pid "
                                  f"{owner.get('pid')}); wait for it, stop it, or choose another --run-name")
            log.warning("%s: the run that held it (pid %s) is gone; taking over", lock, owner.get("pid"))
            lock.unlink(missing_ok=True)
        raise RunDirError(f"--run-name {run_name}: {lock} is being taken by another run at this moment")
    finally:
        mine.unlink(missing_ok=True)


def release(run_dir: str | Path) -> None:
    """Remove RUN/.lock if this process holds it (safe to call when it does not)."""
    lock = Path(run_dir) / LOCK_FILE
    if lock.exists() and _read(lock) == _me():
        lock.unlink(missing_ok=True)


def _read(lock: Path) -> dict:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def clear(run_dir: str | Path, inputs: dict[str, str | None]) -> None:
    """--overwrite: empty the run directory (its lock stays), refusing, before anything is
    deleted, when one of this run's `inputs` (flag -> path: --base-model RUN/final, a
    checkpoint, --encoder-cache, the data) lies inside it: it would be gone before it is read."""
    run = Path(run_dir).resolve()
    for flag, value in inputs.items():
        if value and Path(value).exists() and Path(value).resolve().is_relative_to(run):
            raise RunDirError(f"--overwrite would delete {flag} {value}, which lies inside the run directory "
                              f"{run_dir}; move it out first, or choose another --run-name")
    for entry in Path(run_dir).iterdir():
        if entry.name != LOCK_FILE:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
