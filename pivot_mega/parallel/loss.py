"""Token log-probs and the LM loss, vocab-parallel: no rank ever holds ``[N, V]`` logits."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from kernels import linear_logprob

IGNORE_INDEX = -100


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


def token_logprobs(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label | position) for positions with a label: hidden ``[..., H]``, labels ``[...]`` → ``[M]``.

    Only labelled positions go through the head, so prompt and image positions cost nothing there.
    """
    keep = labels != IGNORE_INDEX
    weight, group = head_shard(head_weight)
    return linear_logprob(hidden[keep], weight, labels[keep], tp_group=group)


def lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
            num_global_labels: int, dp_size: int = 1) -> torch.Tensor:
    """Summed NLL of this rank's labels over ``num_global_labels`` (all labels of the global batch).

    Data-parallel gradient reduction averages over ``dp_size`` ranks, so the loss is scaled by it: the
    reduced gradient is then the gradient of the mean NLL over the whole batch, as in one process.
    """
    return -token_logprobs(hidden, head_weight, labels).sum() * (dp_size / num_global_labels)
