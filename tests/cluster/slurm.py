"""A real one-node Slurm cluster on loopback for tests: munged, slurmctld and slurmd started by us.

    cluster = LocalSlurm(tmp_dir, cpus=2)      # writes the munge key and slurm.conf, starts the daemons
    job = cluster.sbatch(["--wrap", "srun hostname"])
    state = cluster.wait(job, {"COMPLETED"})
    cluster.stop()                             # the daemons, by the PIDs we started

    LocalSlurm(tmp_dir, cpus=1, nodes=2)       # two nodes, node1 and node2, on this one machine

With ``nodes`` > 1 every node is a network namespace of its own (``NodeNetwork``: one veth each on a
bridge, node k at 10.200.S.k, the host at 10.200.S.254) with its own slurmd, so each node has its own
address, as on a real cluster; slurmctld, munged and the clients stay in the host's namespace.
Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2's ``ip``; ``NodeNetworkUnavailable`` says why not.

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


class NodeNetworkUnavailable(SlurmUnavailable):
    """The network namespaces of a multi-node cluster cannot be made here (the command and error say why)."""


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


class NodeNetwork:
    """``count`` network namespaces on one bridge of the host: node k at 10.200.S.k on interface
    ``IFNAME`` (the same name in every namespace), the host at 10.200.S.254. ``remove()`` undoes it."""

    IFNAME = "pv0"

    def __init__(self, count: int):
        if os.geteuid() != 0:
            raise NodeNetworkUnavailable("network namespaces for the nodes need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
        for command, package in (("ip", "iproute2"), ("nsenter", "util-linux")):
            if shutil.which(command) is None:
                raise NodeNetworkUnavailable(f"no `{command}` command (apt-get install {package})")
        tag = f"{os.getpid() % 100000:05d}"
        used = self._ip("-br", "addr", check=False).stdout
        subnet = next((f"10.200.{(int(tag) + i) % 250}" for i in range(250)
                       if f" 10.200.{(int(tag) + i) % 250}." not in used), None)
        if subnet is None:
            raise NodeNetworkUnavailable("no free 10.200.S.0/24 subnet for the node network")
        self.bridge = f"ptb{tag}"
        self.host_addr = f"{subnet}.254"
        self.namespaces = [f"pt{tag}n{k}" for k in range(1, count + 1)]
        self.veths = [f"ptv{tag}n{k}" for k in range(1, count + 1)]
        self.addrs = [f"{subnet}.{k}" for k in range(1, count + 1)]
        try:
            self._ip("link", "add", self.bridge, "type", "bridge")
            self._ip("addr", "add", f"{self.host_addr}/24", "dev", self.bridge)
            self._ip("link", "set", self.bridge, "up")
            for ns, veth, addr in zip(self.namespaces, self.veths, self.addrs):
                self._ip("netns", "add", ns)
                self._ip("link", "add", veth, "type", "veth", "peer", "name", self.IFNAME, "netns", ns)
                self._ip("link", "set", veth, "master", self.bridge, "up")
                self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", self.IFNAME)
                self._ip("-n", ns, "link", "set", self.IFNAME, "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    @staticmethod
    def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise NodeNetworkUnavailable(f"`ip {' '.join(args)}` failed ({result.returncode}): "
                                         f"{result.stderr.strip()}")
        return result

    def exec_prefix(self, index: int) -> list[str]:
        """The command prefix that runs a program in node ``index``'s (0-based) namespace. Not
        ``ip netns exec``: that mounts a fresh /sys, without /sys/fs/cgroup, and slurmd then fails
        ("No filesystem mounted on /sys/fs/cgroup"); nsenter changes the network namespace only."""
        return ["nsenter", f"--net=/run/netns/{self.namespaces[index]}"]

    def remove(self) -> None:
        for ns in getattr(self, "namespaces", []):
            self._ip("netns", "del", ns, check=False)
        for veth in getattr(self, "veths", []):  # gone with their namespace's end, usually
            self._ip("link", "del", veth, check=False)
        if hasattr(self, "bridge"):
            self._ip("link", "del", self.bridge, check=False)


class LocalSlurm:
    """One slurmctld + munged and ``nodes`` slurmd of ``cpus`` CPUs each, all under ``root``.

    One node is this host on loopback (named as the host); several are node1, node2, ... in the network
    namespaces of a ``NodeNetwork``, each with its own address (NodeAddr) and slurmd."""

    def __init__(self, root: Path, *, cpus: int = 2, nodes: int = 1, start_timeout: float = 60.0):
        ensure_installed()
        self.root = Path(root)
        self.hostname = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen] = {}
        self.network: NodeNetwork | None = None
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            (self.root / sub).chmod(0o700)
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        try:
            if nodes > 1:
                self.network = NodeNetwork(nodes)
                self.nodes = [f"node{k}" for k in range(1, nodes + 1)]
                self.node_addrs = list(self.network.addrs)
                self.ctld_addr = self.network.host_addr
            else:
                self.nodes, self.node_addrs, self.ctld_addr = [self.hostname], ["127.0.0.1"], "127.0.0.1"
            self.node = self.nodes[0]
            self._start_munge()
            self._write_conf()
            self._start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            for index, node in enumerate(self.nodes):
                if self.network:
                    (self.root / "spool" / node).mkdir(mode=0o700, exist_ok=True)
                prefix = self.network.exec_prefix(index) if self.network else []
                self._start(self._slurmd(node), [*prefix, "slurmd", "-D", "-f", str(self.conf), "-N", node])
            self.wait_idle(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _slurmd(self, node: str) -> str:
        """The name of ``node``'s slurmd in ``procs`` and the log files."""
        return "slurmd" if len(self.nodes) == 1 else f"slurmd-{node}"

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
        # slurmd expands %n to its node's name: one spool, PID and log file per node
        per_node = "" if len(self.nodes) == 1 else "-%n"
        spool = self.root / "spool" / "%n" if per_node else self.root / "spool"
        node_lines = "\n".join(f"NodeName={node} NodeAddr={addr} CPUs={self.cpus} State=UNKNOWN"
                                for node, addr in zip(self.nodes, self.node_addrs))
        self.conf.write_text(f"""\
ClusterName=pivottest
SlurmctldHost={self.hostname}({self.ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={spool}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / f'slurmd{per_node}.pid'}
SlurmctldLogFile={log / 'slurmctld.log'}
SlurmdLogFile={log / f'slurmd{per_node}.log'}
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
{node_lines}
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
        """Cancels the jobs left (a failed test's), stops the daemons we started (SIGTERM, then SIGKILL),
        the slurmd first, and removes the node network."""
        self._cancel_jobs()
        for name in [*(n for n in self.procs if n.startswith("slurmd")), "slurmctld", "munged"]:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.network is not None:
            self.network.remove()
            self.network = None

    def _cancel_jobs(self, timeout: float = 30) -> None:
        """Cancels the pending and running jobs and waits until they are gone: their slurmstepd and
        tasks would outlive slurmd."""
        ctld = self.procs.get("slurmctld")
        if ctld is None or ctld.poll() is not None:
            return
        try:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
            if not jobs:
                return
            self.run("scancel", *jobs, check=False, timeout=10)
            deadline = time.monotonic() + timeout  # KillWait (10 s) after SIGTERM, then SIGKILL
            while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False,
                                                           timeout=10).stdout.split():
                time.sleep(0.5)
        except (OSError, subprocess.SubprocessError):
            pass

    # ------------------------------------------------------------------------------------------
    # clients

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}{result.stdout}")
        return result

    def node_state(self, node: str | None = None) -> str:
        result = self.run("sinfo", "-h", "-N", "-n", node or self.node, "-o", "%T", check=False)
        return result.stdout.strip()

    def _check_daemons(self) -> None:
        for name in list(self.procs):
            self._check_alive(name)

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_daemons()
            states = {node: self.node_state(node) for node in self.nodes}
            if all(state == "idle" for state in states.values()):
                return
            time.sleep(0.5)
        slurmd = "\n".join(f"{self._slurmd(node)}:\n{self.log(self._slurmd(node))}" for node in self.nodes)
        raise SlurmUnavailable(f"nodes not idle after {timeout:.0f} s (states {states}); "
                               f"slurmctld:\n{self.log('slurmctld')}\n{slurmd}")

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
            self._check_daemons()
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {info}")
