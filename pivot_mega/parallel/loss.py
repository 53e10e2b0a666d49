"""Token log-probs and the LM loss, vocab-parallel: no rank ever holds ``[N, V]`` logits."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from ..batch import Targets
from ..kernels import linear_logprob



def head_shard(head_weight: torch.Tensor) -> tuple[torch.Tensor, object]:
    """→ (this rank's ``[V_local, H]`` rows of the LM head, the tp group or None).

    Under tensor parallelism the head is a DTensor split over the vocabulary on the tp mesh; with
    FSDP on top it is also split over data-parallel ranks, and is gathered here along those dims only.
    """
    if not isinstance(head_weight, DTensor):
        return head_weight, None
    mesh = head_weight.device_mesh
    names = mesh.mesh_dim_names or ()
    if "tp" not in names or mesh["tp"].size() == 1:
        return head_weight.full_tensor(), None
    return head_weight.to_local(), mesh["tp"].get_group()


def token_logprobs(hidden: torch.Tensor, head_weight: torch.Tensor, targets: Targets) -> torch.Tensor:
    """log p(token | position) of each target: hidden ``[R, S, H]`` → ``[M]`` (fp32 accumulation).

    Only the targets' positions go through the head, so prompt and image positions cost nothing there.
    """
    weight, group = head_shard(head_weight)
    return linear_logprob(hidden.reshape(-1, hidden.shape[-1])[targets.positions], weight, targets.tokens,
                          tp_group=group)


def lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: Targets,
            num_global_labels: int, dp_size: int = 1) -> torch.Tensor:
    """Summed NLL of this rank's targets over ``num_global_labels`` (all targets of the global batch).

    Data-parallel gradient reduction averages over ``dp_size`` ranks, so the loss is scaled by it: the
    reduced gradient is then the gradient of the mean NLL over the whole batch, as in one process.
    """
    return -token_logprobs(hidden, head_weight, targets).sum() * global_scale(num_global_labels, dp_size)


def global_scale(global_count: int, dp_size: int = 1) -> float:
    """The factor that turns a sum over this rank's share into its part of the global batch mean:
    ``dp_size / global_count``, ``global_count`` the number of terms (label tokens, pairs) in the
    whole global batch (gradient reduction then averages over the ``dp_size`` ranks)."""
    if global_count <= 0:
        raise ValueError(f"global_count must be > 0, got {global_count}")
    return dp_size / global_count
