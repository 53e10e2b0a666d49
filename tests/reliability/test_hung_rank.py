"""A rank that hangs stops the job after ``parallel.timeout_s``, with an error, instead of holding it forever."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from pivot_mega.config import ConfigError
from pivot_mega.parallel import ParallelConfig, build_mesh
from tests.distributed import WorkerError, free_port, require_procs, run_workers
from tests.parallel.test_equivalence import tiny_config

TIMEOUT_S = 5


def _hang_in_all_reduce(rank, world_size, port):
    # The launcher's group has torch's default timeout; build_mesh makes the run's own, as `train` does.
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port)
    dims = build_mesh(ParallelConfig(timeout_s=TIMEOUT_S), tiny_config(), "cpu")
    if rank == 1:
        time.sleep(120)  # hung: never joins the collective (the launcher kills it once rank 0 failed)
        return None
    # A group of the mesh, not the default one: the sub-groups must have the timeout too.
    dist.all_reduce(torch.ones(4), group=dims.mesh["dp_shard"].get_group())
    return "the all_reduce returned without rank 1"


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(120)
@require_procs(2)
def test_a_hung_rank_ends_the_collective_after_timeout_s():
    started = time.monotonic()
    with pytest.raises(WorkerError) as info:
        run_workers(_hang_in_all_reduce, 2, free_port(), timeout=100)
    elapsed = time.monotonic() - started
    message = str(info.value)
    # gloo's own words name the wait, not the collective; the failing rank's traceback names that.
    assert message.startswith("rank 0 of 2 failed:"), message
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in message, message
    assert "dist.all_reduce(" in message, message
    assert elapsed < 45, f"the job took {elapsed:.0f} s to end"


def test_timeout_s_must_be_positive():
    with pytest.raises(ConfigError, match=r"parallel\.timeout_s: must be > 0 seconds, got 0"):
        ParallelConfig(timeout_s=0).validate()
    assert ParallelConfig().timeout_s == 600


def test_the_default_group_gets_timeout_s(monkeypatch):
    """The default group is made with the timeout (no peers here: torch's call is stood in for)."""
    import datetime

    from pivot_mega.parallel import LaunchEnv, init_distributed

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls.append(kwargs))
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "1234")
    for world_size in (2, 1):
        init_distributed(LaunchEnv(rank=0, world_size=world_size, local_rank=0, master_addr="node0",
                                   master_port=1234, launcher="torchrun"), device_type="cpu", timeout_s=TIMEOUT_S)
    assert [kwargs["timeout"] for kwargs in calls] == [datetime.timedelta(seconds=TIMEOUT_S)] * 2



def _mesh_group_timeouts(rank, world_size):
    # The launcher's default group keeps torch's default timeout; the mesh's groups are new ones.
    dims = build_mesh(ParallelConfig(timeout_s=TIMEOUT_S), tiny_config(), "cpu")
    return [dims.mesh[name].get_group()._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for name in ("pp", "dp_replicate", "dp_shard", "tp")]


@pytest.mark.slow
@pytest.mark.multiproc
@require_procs(2)
def test_every_group_of_the_mesh_gets_timeout_s():
    """torch gives a new group its own default timeout, not the default group's: build_mesh passes it on."""
    assert run_workers(_mesh_group_timeouts, 2, timeout=120) == [[TIMEOUT_S] * 4] * 2
