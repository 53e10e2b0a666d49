"""The multi-process launcher itself: results come back by rank, a failing rank's error surfaces."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import WorkerError, run_workers


def _sum_ranks(rank, world_size, scale):
    t = torch.tensor([float(rank + 1) * scale])
    dist.all_reduce(t)
    return rank, t.item()


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def test_results_by_rank():
    assert run_workers(_sum_ranks, 2, 2.0) == [(0, 6.0), (1, 6.0)]


def test_a_failing_rank_is_reported():
    with pytest.raises(WorkerError, match=r"rank 1 of 2 failed:(.|\n)*boom on purpose"):
        run_workers(_fail_on_rank_1, 2)
