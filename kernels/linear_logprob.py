"""Per-token log-probs of label tokens straight from hidden states and the (vocab-sharded) LM head.

    logprob[i] = log_softmax(hidden[i] @ weight_full.T)[labels[i]]

computed without ever holding the logits ``[N, V]``: the vocabulary is walked in tiles with an online
log-sum-exp, and the backward pass recomputes each tile's logits instead of storing them. At Qwen2.5's
151,936-token vocabulary and 8,192 tokens the fp32 logits alone are 5 GB a pass; here the working
set is a few tiles.

Vocab-parallel like Megatron's ``vocab_parallel_cross_entropy``: rank ``r`` of ``tp_group`` holds
rows ``[r * V_local, (r + 1) * V_local)`` of the head, ``hidden`` and ``labels`` (global ids) are the
same on every rank. Each rank reduces its slice to three numbers per token (max logit, sum of
exponentials, label logit if the label is in its slice), and two all-reduces combine them.

Implementations behind :func:`linear_logprob` (``impl=``):

- ``triton``: fused Triton kernels (``triton_linear_logprob.py``); CUDA, or CPU under
  ``TRITON_INTERPRET=1`` for tests.
- ``chunked``: torch ops over ``[token_chunk, vocab_chunk]`` tiles; the CPU default and the readable
  reference for the Triton kernels.
- ``naive``: full logits and ``log_softmax``; for tests and benchmarks only.
- ``auto``: ``triton`` for CUDA tensors when Triton imports, else ``chunked``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.distributed as dist

from .backend import Backend

# torch's cross-entropy convention, as pivot_mega.batch.IGNORE_INDEX. Not imported from there: this folder
# also loads as a top-level package when the repository is the working directory (transformers probes
# a package named `kernels`), where a relative import beyond it fails.
IGNORE_INDEX = -100

IMPLEMENTATIONS = ("auto", "triton", "chunked", "naive")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNKED_DTYPES = TRITON_DTYPES + (torch.float64,)



class KernelUnavailableError(RuntimeError):
    """The requested implementation cannot run here (package missing, wrong device, unsupported dtype)."""


class LinearLogprobOutput(NamedTuple):
    """What :func:`linear_logprob` returns with ``return_stats=True``.

    ``num_tokens`` and ``num_correct`` are counts, so data-parallel ranks can sum them before dividing.
    """

    logprob: torch.Tensor      # [N] fp32 (fp64 for fp64 inputs); 0 at ignored rows
    loss: torch.Tensor         # [] mean NLL over the label tokens (the SFT loss); 0 when there are none
    num_tokens: torch.Tensor   # [] int64, rows whose label is not ignore_index
    num_correct: torch.Tensor  # [] int64, label rows whose label is the top-1 logit

    @property
    def accuracy(self) -> torch.Tensor:
        """[] fp32 top-1 accuracy over the label tokens (0 when there are none)."""
        return self.num_correct.float() / self.num_tokens.clamp(min=1).float()


def linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   tp_group: dist.ProcessGroup | None = None, ignore_index: int = IGNORE_INDEX,
                   token_chunk: int | None = None, vocab_chunk: int | None = None,
                   impl: str = "auto", return_stats: bool = False):
    """Log-probability of each label under ``softmax(hidden @ weight_full.T)``, with autograd.

    Args:
        hidden: ``[N, H]`` fp32/bf16/fp16 (fp64 for ``chunked``/``naive``), the same on every TP rank.
        weight: ``[V_local, H]`` same dtype; this rank's rows ``[r * V_local, (r + 1) * V_local)``
            of the output layer (the whole layer without ``tp_group``).
        labels: ``[N]`` integer global token ids in ``[0, V_local * tp_size)``, or ``ignore_index``.
        tp_group: the tensor-parallel group the vocabulary is split over; None for no split.
        token_chunk, vocab_chunk: tile sizes (tokens x vocabulary rows) of the chunked path and of
            the Triton backward pass; None picks the implementation's default.
        impl: ``auto`` | ``triton`` | ``chunked`` | ``naive`` (see the module docstring).
        return_stats: also return the SFT loss and accuracy counts (:class:`LinearLogprobOutput`).

    Returns:
        ``logprob [N]`` in fp32 (fp64 for fp64 inputs), 0 at ignored rows, or a
        :class:`LinearLogprobOutput`. Gradients flow to ``hidden`` and ``weight``; the gradient of
        ``hidden`` is the full one on every TP rank (summed over the vocabulary shards).
    """
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    _check_inputs(hidden, weight, labels, ignore_index, tp_size)
    for chunk_name, chunk in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"linear_logprob: {chunk_name} must be a positive int or None, got {chunk!r}")
    # Only a choice that could land on Triton pays for importing it.
    asks_triton = impl == "triton" or (impl == "auto" and hidden.device.type == "cuda")
    name = resolve_impl(impl, device_type=hidden.device.type, dtype=hidden.dtype,
                        triton_error=triton_import_error() if asks_triton else None,
                        interpret=asks_triton and triton_interpreting())
    if name == "naive":
        logprob, is_top1 = naive_linear_logprob(hidden, weight, labels, tp_group=tp_group,
                                                ignore_index=ignore_index)
    else:
        backend = CHUNKED if name == "chunked" else _triton_backend()
        logprob, is_top1 = _LinearLogprob.apply(
            hidden, weight, labels, backend, tp_group, tp_rank, ignore_index,
            token_chunk or backend.token_chunk, vocab_chunk or backend.vocab_chunk)
    if not return_stats:
        return logprob
    num_tokens = (labels != ignore_index).sum()
    loss = -logprob.sum() / num_tokens.clamp(min=1)
    return LinearLogprobOutput(logprob, loss, num_tokens, is_top1.sum())


# ----------------------------------------------------------------------------------------------
# Choosing an implementation


@functools.cache
def triton_import_error() -> str | None:
    """None when ``import triton`` works, else why it does not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to import means "not available", with its reason
        return f"{type(e).__name__}: {e}"
    return None


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    if triton_import_error() is not None:
        return False
    from triton import knobs

    return bool(knobs.runtime.interpret)


def resolve_impl(impl: str, *, device_type: str, dtype: torch.dtype, triton_error: str | None,
                 interpret: bool) -> str:
    """Maps ``impl`` to an implementation that can run on these inputs, or raises saying why not.

    ``triton_error`` is :func:`triton_import_error`'s answer, ``interpret`` :func:`triton_interpreting`'s.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"linear_logprob: unknown impl {impl!r}; choose one of {IMPLEMENTATIONS}")
    triton_runs_here = device_type == "cuda" or (device_type == "cpu" and interpret)
    if impl == "auto":
        if device_type == "cuda" and triton_error is None and dtype in TRITON_DTYPES:
            return "triton"
        return "chunked"
    if impl == "triton":
        if triton_error is not None:
            raise KernelUnavailableError(f"linear_logprob impl='triton' needs the triton package, "
                                         f"which does not import here ({triton_error})")
        if not triton_runs_here:
            raise KernelUnavailableError(
                f"linear_logprob impl='triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1 "
                f"set before triton is imported); hidden is on {device_type}")
        if dtype not in TRITON_DTYPES:
            raise KernelUnavailableError(f"linear_logprob impl='triton' takes {TRITON_DTYPES}, "
                                         f"hidden is {dtype}; use impl='chunked'")
    return impl


def _triton_backend() -> Backend:
    # Imported on first use: the module defines @triton.jit kernels, which Triton builds for the GPU
    # or for its interpreter depending on TRITON_INTERPRET at import time.
    from . import triton_linear_logprob

    return triton_linear_logprob.TRITON


# ----------------------------------------------------------------------------------------------
# Input checks


def _check_inputs(hidden, weight, labels, ignore_index, tp_size):
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"linear_logprob expects hidden [N, H], weight [V_local, H], labels [N]; got "
                         f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_logprob: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         f"disagree on the hidden size H")
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_logprob: labels {tuple(labels.shape)} and hidden {tuple(hidden.shape)} "
                         f"disagree on the number of tokens N")
    if weight.shape[0] == 0:
        raise ValueError(f"linear_logprob: weight {tuple(weight.shape)} holds no vocabulary rows")
    if hidden.dtype != weight.dtype or hidden.dtype not in CHUNKED_DTYPES:
        raise TypeError(f"linear_logprob: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share "
                        f"one of {CHUNKED_DTYPES}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"linear_logprob: labels must be integer token ids, got {labels.dtype}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(f"linear_logprob: hidden ({hidden.device}), weight ({weight.device}) and labels "
                         f"({labels.device}) must be on one device")
    vocab_size = weight.shape[0] * tp_size
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_logprob: labels[{index}] = {int(labels[index])} is outside the vocabulary "
                         f"[0, {vocab_size}) = {tp_size} rank(s) x weight {tuple(weight.shape)}, and is not "
                         f"ignore_index={ignore_index}")


def local_labels(labels: torch.Tensor, vocab_start: int, vocab_local: int) -> torch.Tensor:
    """``[N]`` int64 column of each label in this rank's slice, -1 where it is elsewhere or ignored."""
    local = labels.long() - vocab_start
    return torch.where((local >= 0) & (local < vocab_local), local, -1)


# ----------------------------------------------------------------------------------------------
# Autograd and the vocab-parallel reductions (shared by the chunked and Triton paths)


def combine_over_vocab_shards(row_max, row_sumexp, target, tp_group):
    """Per-token statistics of this rank's vocab slice → the whole vocabulary's, over ``tp_group``.

    ``row_max``, ``row_sumexp`` (of exp(logit - row_max)), ``target`` (the label's logit where this
    rank holds it, else 0): ``[N]`` fp32. Returns ``(logsumexp, target logit, max logit)``, each ``[N]``.
    """
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
        # One all-reduce carries both sums; the label logit lives on exactly one rank, 0 elsewhere.
        sums = torch.stack([row_sumexp * torch.exp(row_max - global_max), target])
        dist.all_reduce(sums, group=tp_group)
        row_max, row_sumexp, target = global_max, sums[0], sums[1]
    return row_max + torch.log(row_sumexp), target, row_max


class _LinearLogprob(torch.autograd.Function):
    """Vocab-parallel fused linear + log-softmax + gather.

    Which collective goes where (Megatron's vocab-parallel cross entropy, with the head's matmul
    inside): the forward all-reduces (max, sum of exponentials, label logit) produce constants of the
    backward pass, the global log-sum-exp, and are not differentiated through. In the backward pass
    the logits' gradient ``g * (onehot - softmax)`` is local to a vocab slice, so each rank's weight
    gradient needs no communication, while each rank's ``d logits @ weight_local`` is only this
    slice's share of the hidden gradient: those shares are summed by an all-reduce over the TP group
    (the backward of Megatron's ``copy_to_tensor_model_parallel_region`` on the head's input).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, backend, tp_group, tp_rank, ignore_index, token_chunk,
                vocab_chunk):
        vocab_local = weight.shape[0]
        labels_here = local_labels(labels, tp_rank * vocab_local, vocab_local)
        row_max, row_sumexp, target = backend.logit_stats(hidden, weight, labels_here,
                                                          token_chunk=token_chunk, vocab_chunk=vocab_chunk)
        lse, target, max_logit = combine_over_vocab_shards(row_max, row_sumexp, target, tp_group)
        has_label = labels != ignore_index
        logprob = torch.where(has_label, target - lse, 0.0)
        # The label logit and the max come from the same fp32 tile values, so equality is exact.
        is_top1 = has_label & (target >= max_logit)
        ctx.save_for_backward(hidden, weight, labels_here, lse, has_label)
        ctx.backend, ctx.tp_group = backend, tp_group
        ctx.chunks = (token_chunk, vocab_chunk)
        ctx.mark_non_differentiable(is_top1)
        return logprob, is_top1

    @staticmethod
    def backward(ctx, grad_logprob, _grad_is_top1):
        hidden, weight, labels_here, lse, has_label = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_logprob = torch.where(has_label, grad_logprob, 0.0).to(lse.dtype)
        grad_hidden, grad_weight = ctx.backend.logit_grads(
            hidden, weight, labels_here, lse, grad_logprob, token_chunk=ctx.chunks[0],
            vocab_chunk=ctx.chunks[1], need_hidden=need_hidden, need_weight=need_weight)
        if grad_hidden is not None:
            tp_group = ctx.tp_group
            if tp_group is not None and dist.get_world_size(tp_group) > 1:
                dist.all_reduce(grad_hidden, group=tp_group)  # fp32, before rounding to hidden's dtype
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Chunked torch implementation: the CPU default and the reference the Triton kernels follow.

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def logit_stats(hidden, weight, labels_here, *, token_chunk, vocab_chunk):
    """This slice's per-token max logit, sum of exp(logit - max) and label logit (0 if not here).

    ``hidden [N, H]``, ``weight [V_local, H]``, ``labels_here [N]`` (-1: not in this slice) →
    three ``[N]`` tensors in fp32 (fp64 for fp64 inputs). Tiles are ``[token_chunk, vocab_chunk]``.
    """
    num_tokens, vocab_local = hidden.shape[0], weight.shape[0]
    dtype = _compute_dtype(hidden.dtype)
    row_max = torch.full((num_tokens,), float("-inf"), dtype=dtype, device=hidden.device)
    row_sumexp = torch.zeros(num_tokens, dtype=dtype, device=hidden.device)
    target = torch.zeros(num_tokens, dtype=dtype, device=hidden.device)
    for v0 in range(0, vocab_local, vocab_chunk):
        weight_chunk = weight[v0:v0 + vocab_chunk].to(dtype)                # [Vc, H]
        for t0 in range(0, num_tokens, token_chunk):
            rows = slice(t0, t0 + token_chunk)
            logits = hidden[rows].to(dtype) @ weight_chunk.T                 # [Tc, Vc]
            cols = labels_here[rows] - v0
            here = (cols >= 0) & (cols < logits.shape[1])
            target[rows][here] = logits[here, cols[here]]
            # Online log-sum-exp: rescale the running sum to the new max before adding this tile.
            new_max = torch.maximum(row_max[rows], logits.amax(dim=1))
            row_sumexp[rows] = (row_sumexp[rows] * torch.exp(row_max[rows] - new_max)
                                + logits.sub_(new_max[:, None]).exp_().sum(dim=1))
            row_max[rows] = new_max
    return row_max, row_sumexp, target


def logit_grads(hidden, weight, labels_here, lse, grad_logprob, *, token_chunk, vocab_chunk,
                need_hidden=True, need_weight=True):
    """Gradients of ``sum(grad_logprob * logprob)`` through this vocab slice, logits recomputed by tile.

    ``lse [N]`` is the log-sum-exp over the whole vocabulary. The logits' gradient of a tile is
    ``grad_logprob[:, None] * (onehot(label) - exp(logits - lse[:, None]))``. Returns
    ``(grad_hidden [N, H] fp32/fp64, this slice's share; grad_weight [V_local, H] in weight's dtype)``,
    either None when not needed. The vocabulary is the outer loop so that each weight row's gradient
    is summed over all tokens in full precision and written once.
    """
    num_tokens, vocab_local = hidden.shape[0], weight.shape[0]
    dtype = _compute_dtype(hidden.dtype)
    grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    for v0 in range(0, vocab_local, vocab_chunk):
        weight_chunk = weight[v0:v0 + vocab_chunk].to(dtype)                # [Vc, H]
        grad_weight_chunk = torch.zeros(weight_chunk.shape, dtype=dtype, device=weight.device)
        for t0 in range(0, num_tokens, token_chunk):
            rows = slice(t0, t0 + token_chunk)
            hidden_chunk = hidden[rows].to(dtype)
            grad_logits = torch.exp_(torch.sub(hidden_chunk @ weight_chunk.T, lse[rows, None]))
            grad_logits.mul_(-grad_logprob[rows, None])                    # -g * softmax, [Tc, Vc]
            cols = labels_here[rows] - v0
            here = (cols >= 0) & (cols < grad_logits.shape[1])
            grad_logits[here, cols[here]] += grad_logprob[rows][here]      # + g * onehot
            if need_hidden:
                grad_hidden[rows].addmm_(grad_logits, weight_chunk)
            if need_weight:
                grad_weight_chunk.addmm_(grad_logits.T, hidden_chunk)
        if need_weight:
            grad_weight[v0:v0 + vocab_chunk] = grad_weight_chunk
    return grad_hidden, grad_weight


# Tiles of 2048 x 4096 fp32 logits (32 MiB): big enough for efficient CPU matmuls, small next to the
# 5 GB of full logits at 8,192 tokens x 151,936.
CHUNKED = Backend("chunked", logit_stats, logit_grads, token_chunk=2048, vocab_chunk=4096)


# ----------------------------------------------------------------------------------------------
# Naive implementation (tests and benchmarks): the full [N, V] logits, plain autograd.


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (Megatron's "copy to the
    tensor-parallel region"): each rank's use of a replicated input contributes a share of its gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad_over_group(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``x`` unchanged; its gradient is summed over ``group`` in backward."""
    return _SumGradOverGroup.apply(x, group)


class _GatherVocabShards(torch.autograd.Function):
    """``[N, V_local]`` on each rank → ``[N, V]``; backward keeps this rank's columns.

    Every rank computes the same loss from the gathered logits, so each rank's gradient of them is
    already complete: no reduction, just the slice.
    """

    @staticmethod
    def forward(ctx, logits, tp_group):
        ctx.rank, ctx.width = dist.get_rank(tp_group), logits.shape[1]
        shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(shards, logits.contiguous(), group=tp_group)
        return torch.cat(shards, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width], None


def naive_linear_logprob(hidden, weight, labels, *, tp_group=None, ignore_index=IGNORE_INDEX):
    """``log_softmax(hidden @ weight.T)`` gathered at the labels, holding all ``[N, V]`` logits.

    Computes in fp32 (fp64 for fp64 inputs); with ``tp_group`` the logits of all ranks are gathered.
    Returns ``(logprob [N], is_top1 [N] bool)``.
    """
    dtype = _compute_dtype(hidden.dtype)
    split = tp_group is not None and dist.get_world_size(tp_group) > 1
    if split:
        hidden = sum_grad_over_group(hidden, tp_group)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if split:
        logits = _GatherVocabShards.apply(logits, tp_group)
    has_label = labels != ignore_index
    safe_labels = torch.where(has_label, labels.long(), 0)[:, None]
    logprob = torch.log_softmax(logits, dim=-1).gather(1, safe_labels).squeeze(1)
    is_top1 = has_label & (logits.detach().gather(1, safe_labels).squeeze(1) >= logits.detach().amax(dim=1))
    return torch.where(has_label, logprob, 0.0), is_top1
