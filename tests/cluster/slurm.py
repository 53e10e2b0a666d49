"""A real one-node Slurm cluster on loopback for tests: munged, slurmctld and slurmd started by us.

    cluster = LocalSlurm(tmp_dir, cpus=2)      # writes the munge key and slurm.conf, starts the daemons
    job = cluster.sbatch(["--wrap", "srun hostname"])
    state = cluster.wait(job, {"COMPLETED"})
    cluster.stop()                             # the daemons, by the PIDs we started

Every daemon runs in the foreground as a child of the test process, with its state, spool, socket
and logs in ``tmp_dir``; clients find the cluster through ``SLURM_CONF`` (``cluster.env``). Debian's
``slurm-wlm`` and ``munge`` packages are installed with apt-get when missing and we are root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (the reason says why)."""


def ensure_installed() -> None:
    """Installs slurm-wlm and munge with apt-get if a binary is missing (root only)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm binaries {missing} are missing and cannot be installed here "
                               f"(needs root and apt-get: apt-get install {' '.join(PACKAGES)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")
    still = [b for b in BINARIES if shutil.which(b) is None]
    if still:
        raise SlurmUnavailable(f"after installing {PACKAGES}, {still} are still missing")


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


class LocalSlurm:
    """One slurmctld + one slurmd (this host, ``cpus`` CPUs) + munged, all under ``root``."""

    def __init__(self, root: Path, *, cpus: int = 2, start_timeout: float = 60.0):
        ensure_installed()
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen] = {}
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            (self.root / sub).chmod(0o700)
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        try:
            self._start_munge()
            self._write_conf()
            self._start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self.wait_idle(start_timeout)
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------------------------------
    # daemons

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._start("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            self._check_alive("munged")
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged did not create {self.munge_socket}; log:\n{self.log('munged')}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        ctld_port, slurmd_port = _free_ports(2)
        log = self.root / "log"
        self.conf.write_text(f"""\
ClusterName=pivottest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool'}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd.pid'}
SlurmctldLogFile={log / 'slurmctld.log'}
SlurmdLogFile={log / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, name: str, command: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        out.close()

    def _check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise SlurmUnavailable(f"{name} exited with {proc.returncode}; output:\n{self.log(name)}")

    def log(self, name: str) -> str:
        texts = []
        for path in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.stdout"):
            if path.exists():
                texts.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(texts)

    def stop(self) -> None:
        """Stops the daemons we started (SIGTERM, then SIGKILL), slurmd first."""
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    # ------------------------------------------------------------------------------------------
    # clients

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}{result.stdout}")
        return result

    def node_state(self) -> str:
        result = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False)
        return result.stdout.strip()

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name in ("munged", "slurmctld", "slurmd"):
                self._check_alive(name)
            state = self.node_state()
            if state == "idle":
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"node {self.node} not idle after {timeout:.0f} s (state {state!r}); "
                               f"slurmctld:\n{self.log('slurmctld')}\nslurmd:\n{self.log('slurmd')}")

    def sbatch(self, args: list[str], *, cwd: Path | None = None, env: dict | None = None) -> str:
        result = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {args} failed ({result.returncode}): {result.stderr}{result.stdout}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, StdOut ...); {} once purged."""
        for attempt in range(5):
            result = self.run("scontrol", "-o", "show", "job", job_id, check=False)
            if result.returncode == 0:
                break
            if "Invalid job id" in result.stderr:
                return {}
            time.sleep(0.5)  # slurmctld busy (e.g. requeueing): ask again
        else:
            raise RuntimeError(f"scontrol show job {job_id} failed: {result.stderr}")
        fields = {}
        for item in result.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, states: set[str], timeout: float = 300.0, poll: float = 0.5) -> dict[str, str]:
        """Waits until the job is in one of ``states`` (or any terminal state); → its fields."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in states or state in TERMINAL:
                return info
            for name in ("munged", "slurmctld", "slurmd"):
                self._check_alive(name)
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {info}")
