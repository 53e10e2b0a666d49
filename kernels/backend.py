"""What an implementation of :func:`linear_logprob` provides, and the log-sum-exp merge they share.

Its own module so that the dispatch (``linear_logprob.py``) imports the Triton implementation
(``triton_linear_logprob.py``) and both import this, with no import going back up.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Backend(NamedTuple):
    """One implementation of the per-slice work; the vocab-parallel reductions and autograd are shared.

    ``logit_stats(hidden, weight, labels_here, *, token_chunk, vocab_chunk) -> (max, sumexp, target)``
    and ``logit_grads(hidden, weight, labels_here, lse, grad_logprob, *, token_chunk, vocab_chunk,
    need_hidden, need_weight) -> (grad_hidden, grad_weight)``; see the chunked functions in
    ``linear_logprob.py``.
    """

    name: str
    logit_stats: Callable
    logit_grads: Callable
    token_chunk: int   # default tile sizes
    vocab_chunk: int


def merge_partial_stats(row_max: torch.Tensor, row_sumexp: torch.Tensor):
    """Merges log-sum-exp partials over dim 0: ``[S, N]`` max and sum of exp(logit - max) → ``[N]`` each."""
    merged_max = row_max.amax(dim=0)
    return merged_max, (row_sumexp * torch.exp(row_max - merged_max)).sum(dim=0)
