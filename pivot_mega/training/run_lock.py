"""One run per output directory: ``OUT/pivot-mega.lock`` names the run that holds it.

    with RunLock(out_dir):          # rank 0 only; ConfigError naming the holder if another run has it
        ...

The lock file is created exclusively (``O_CREAT | O_EXCL``) and holds the holder's host, pid, process
start time and Slurm job. A lock left by a run that died (``kill -9``, a lost node) is stale and taken
over, with a warning, when it can be told dead: on the same host, its pid is gone or is another
process (another start time); under Slurm, it belongs to an earlier incarnation of this requeued job
(same job id, another restart count). A lock of a live run, or of a run on another host that cannot be
checked, is refused with its holder named: delete the file when you know that run has ended. The
check-and-take-over happens under an ``flock`` of ``OUT/pivot-mega.lock.guard``, so two runs finding
the same stale lock do not both take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from ..config import ConfigError

LOCK_FILE = "pivot-mega.lock"
log = logging.getLogger(__name__)


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_holder() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def describe_holder(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


def why_stale(holder: dict, me: dict) -> str | None:
    """Why the run that wrote ``holder`` is known to be dead, or None when it may be alive."""
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me.get("slurm_job_id") and \
            holder.get("slurm_restart_count") != me.get("slurm_restart_count"):
        return f"an earlier run of this Slurm job (restart {holder.get('slurm_restart_count')})"
    if holder.get("host") != me["host"]:
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return f"pid {pid} is not running on this host"
    if holder.get("process_start") is not None and _process_start(pid) != holder["process_start"]:
        return f"pid {pid} is now another process"
    return None


class RunLock:
    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_FILE
        self.holder = this_holder()
        self._held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._guard():
            if not self._create():
                holder = self._read()
                reason = why_stale(holder, self.holder) if holder is not None else "the lock file is unreadable"
                if reason is None:
                    raise ConfigError(f"{self.path.parent} is in use by another run ({describe_holder(holder)}); "
                                      f"give this run another train.out_dir, or delete {self.path} if that run "
                                      f"has ended")
                log.warning("train: taking over %s: its run is gone (%s)", self.path, reason)
                self.path.unlink(missing_ok=True)
                if not self._create():
                    raise ConfigError(f"{self.path}: another run took the lock first ({describe_holder(self._read() or {})})")
        self._held = True
        return self

    def release(self) -> None:
        """Removes the lock if it is still this run's."""
        if not self._held:
            return
        self._held = False
        holder = self._read()
        if holder is not None and holder.get("pid") == self.holder["pid"] and holder.get("host") == self.holder["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.holder) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> dict | None:
        try:
            value = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    @contextlib.contextmanager
    def _guard(self):
        with open(self.path.with_name(LOCK_FILE + ".guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)
