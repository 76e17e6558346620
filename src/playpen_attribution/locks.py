"""Snakemake's directory lock after a kill.

Snakemake locks the working directory while it runs and refuses a second process with "Directory cannot be
locked" (two invocations on one results folder must not write the same files). Its lock files say nothing about
who holds them, so after a kill (SIGKILL, an OOM killer, a node gone) the same command is refused until the user
runs `--unlock`. This module tells a dead owner from a live one: the workflow records the process that holds the
lock when it starts running jobs (`record_owner`, in `onstart`) and forgets it when it ends (`clear_owner`); a
later invocation removes the locks only when their recorded owner was a process on this host that no longer runs
(`remove_stale_locks`). Everything else (a live owner, another host, no record) is left to Snakemake's own
refusal and its `--unlock` advice.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

OWNER_FILE = Path(".snakemake") / "playpen-lock-owner.json"
LOCKS = Path(".snakemake") / "locks"


def record_owner(workdir: str | Path = ".") -> None:
    """Note this process (the one holding Snakemake's locks) and its host."""
    path = Path(workdir) / OWNER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    tmp.replace(path)


def clear_owner(workdir: str | Path = ".") -> None:
    (Path(workdir) / OWNER_FILE).unlink(missing_ok=True)


def _running_snakemake(pid: int) -> bool:
    """Whether `pid` is a live process that is a Snakemake (a reused pid of another program is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        data = cmdline.read_bytes()
    except OSError:
        return True  # no /proc here: alive is all that can be said
    # empty while a process is still starting (mid-exec) or a zombie: not known to be another program
    return b"snakemake" in data if data else True


def remove_stale_locks(workdir: str | Path = ".") -> str | None:
    """Remove Snakemake's locks when the process recorded as their owner, on this host, has died; returns what was
    done (None when nothing was: no locks, no record, another host, or a live owner)."""
    workdir = Path(workdir)
    owner_path, locks = workdir / OWNER_FILE, workdir / LOCKS
    lock_files = sorted(locks.glob("*.lock")) if locks.is_dir() else []
    if not owner_path.is_file():
        return None
    try:
        owner = json.loads(owner_path.read_text())
        pid, host = int(owner["pid"]), owner["host"]
    except (ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname() or _running_snakemake(pid):
        return None
    for lock in lock_files:
        lock.unlink(missing_ok=True)
    owner_path.unlink(missing_ok=True)
    if not lock_files:
        return None
    return (f"removed the locks of a Snakemake process that no longer runs (pid {pid} on {host}, killed or lost): "
            f"{len(lock_files)} lock file(s) in {locks}; interrupted jobs are rerun")
