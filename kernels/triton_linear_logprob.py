"""Triton kernels for :func:`pivot_mega.kernels.linear_logprob.linear_logprob` (``impl="triton"``).

Forward: one fused kernel. A program owns ``BLOCK_N`` tokens and a contiguous run of vocabulary tiles;
for each ``[BLOCK_N, BLOCK_V]`` tile it computes the logits with ``tl.dot`` over ``BLOCK_K`` slices
of the hidden size (fp32 accumulation) and folds them into a running max / sum of exponentials /
label logit. Only those three ``[N]`` rows per vocabulary split reach memory; the splits (a second
grid axis, so that short batches still fill the GPU) are merged like tensor-parallel shards.

Backward: the logits are recomputed, never stored. For each ``[token_chunk, vocab_chunk]`` block a
fused kernel recomputes the logits and writes their gradient ``g * (onehot - softmax)`` in the
input dtype, and a Triton matmul adds ``grad_logits @ weight`` / ``grad_logits.T @ hidden`` into
fp32 accumulators, so bf16/fp16 inputs lose nothing to partial sums. The chunked torch functions in
``linear_logprob.py`` are the same computation written with torch ops.

Runs on CUDA, or on CPU tensors with ``TRITON_INTERPRET=1`` set before this module is imported.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .backend import Backend, merge_partial_stats


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_n: int        # tokens per program
    block_v: int        # vocabulary rows per tile
    block_k: int        # hidden-size slice per tl.dot
    num_warps: int
    num_stages: int
    min_programs: int   # the forward splits the vocabulary until the grid has this many programs
    widen_bf16: bool    # convert bf16 tiles to fp32 before tl.dot (interpreter only, see launch_config)
    matmul_block_n: int = 0  # the backward matmuls' N tile (block_n x this); 0: block_v


def launch_config(device: torch.device, dtype: torch.dtype) -> LaunchConfig:
    """Tile sizes: H100-sized on CUDA; 16 (tl.dot's minimum) in the interpreter, where small tiles
    make small test shapes cross tile, chunk and split boundaries."""
    if device.type != "cuda":
        # Triton's interpreter (3.6, 3.7) multiplies bf16 tiles as their raw uint16 bits in tl.dot;
        # widening them to fp32 first is exact and is the maths of the GPU's bf16 dot (fp32 products
        # and accumulation).
        return LaunchConfig(16, 16, 16, num_warps=1, num_stages=1, min_programs=4,
                            widen_bf16=dtype == torch.bfloat16, matmul_block_n=16)
    return cuda_launch_config(dtype, torch.cuda.get_device_properties(device).multi_processor_count)


def cuda_launch_config(dtype: torch.dtype, multi_processors: int = 132) -> LaunchConfig:
    """The tiles of the CUDA path (an H100 SXM has 132 SMs), sized so that no kernel spills registers
    on sm_90a (``kernels.hopper`` compiles them; ``tests/kernels/test_hopper_compile.py`` checks it).

    bf16 / fp16: 128 x 128 logit tiles, k slices of 64 (wgmma); the backward matmuls hold a 128 x 128
    fp32 accumulator plus their operands, which spills (255 registers, 1 KB): they take 128 x 64.
    fp32 (ieee FMA, no tensor cores): 64 x 64 tiles, k slices of 32; 128 x 128 spills in every kernel.
    """
    if dtype == torch.float32:
        return LaunchConfig(64, 64, 32, num_warps=8, num_stages=3, min_programs=2 * multi_processors,
                            widen_bf16=False, matmul_block_n=64)
    return LaunchConfig(128, 128, 64, num_warps=8, num_stages=3, min_programs=2 * multi_processors,
                        widen_bf16=False, matmul_block_n=64)


def _dot_precision(dtype: torch.dtype) -> str:
    # Triton's default for fp32 dots is TF32 (10-bit mantissa): too coarse for logits near 1e4.
    return "ieee" if dtype == torch.float32 else "tf32"


def _shared_constants(cfg: LaunchConfig, dtype: torch.dtype) -> dict:
    """The compile-time arguments every kernel here takes besides its tile sizes."""
    return dict(BLOCK_K=cfg.block_k, WIDEN=cfg.widen_bf16,
                DOT_PRECISION="ieee" if cfg.widen_bf16 else _dot_precision(dtype))


def _kernel_args(cfg: LaunchConfig, dtype: torch.dtype) -> dict:
    """The compile-time arguments every kernel here takes besides its tile sizes, and the launch options."""
    return dict(_shared_constants(cfg, dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, rows, row_mask, cols, col_mask, hidden_size,
                 stride_hn, stride_hk, stride_wv, stride_wk,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 WIDEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``hidden[rows] @ weight[cols].T`` as a ``[BLOCK_N, BLOCK_V]`` fp32 tile (0 outside the masks)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden_size
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if WIDEN:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _logit_stats_kernel(hidden_ptr, weight_ptr, labels_ptr, max_ptr, sumexp_ptr, target_ptr,
                        num_tokens, vocab_size, hidden_size, tiles_per_split,
                        stride_hn, stride_hk, stride_wv, stride_wk,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        WIDEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid ``(token blocks, vocab splits)``; writes ``[splits, N]`` max, sum-exp and label logit."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < num_tokens
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_tile = split * tiles_per_split
    end_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(vocab_size, BLOCK_V))
    # The host sizes the splits so every split has at least one tile, and every tile at least one
    # real column: run_max is finite after the first tile and exp(run_max - new_max) is never NaN.
    for tile in range(first_tile, end_tile):
        cols = (tile * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < vocab_size
        logits = _logits_tile(hidden_ptr, weight_ptr, rows, row_mask, cols, col_mask, hidden_size,
                              stride_hn, stride_hk, stride_wv, stride_wk,
                              BLOCK_N, BLOCK_V, BLOCK_K, WIDEN, DOT_PRECISION)
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
    out = split * num_tokens + rows
    tl.store(max_ptr + out, run_max, mask=row_mask)
    tl.store(sumexp_ptr + out, run_sum, mask=row_mask)
    tl.store(target_ptr + out, target, mask=row_mask)


@triton.jit
def _grad_logits_kernel(hidden_ptr, weight_ptr, labels_ptr, lse_ptr, grad_ptr, out_ptr,
                        num_tokens, vocab_size, hidden_size, label_offset,
                        stride_hn, stride_hk, stride_wv, stride_wk, stride_on, stride_ov,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        WIDEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid ``(token blocks, vocab tiles)``: ``out = grad * (onehot(label - label_offset) - softmax)``."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_mask = rows < num_tokens
    col_mask = cols < vocab_size
    logits = _logits_tile(hidden_ptr, weight_ptr, rows, row_mask, cols, col_mask, hidden_size,
                          stride_hn, stride_hk, stride_wv, stride_wk,
                          BLOCK_N, BLOCK_V, BLOCK_K, WIDEN, DOT_PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1) - label_offset
    onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    grad_logits = grad[:, None] * (onehot - tl.exp(logits - lse[:, None]))
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_ov,
             grad_logits.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _matmul_accumulate_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                              stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              WIDEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``c[M, N] (fp32) += a[M, K] @ b[K, N]``, grid ``(M blocks, N blocks)``."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < M
    col_mask = cols < N
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    c_mask = row_mask[:, None] & col_mask[None, :]
    acc = tl.load(c_ptrs, mask=c_mask, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if WIDEN:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    tl.store(c_ptrs, acc, mask=c_mask)


def kernel_signatures(pointer: str) -> dict:
    """Each kernel's runtime argument types for ahead-of-time compilation (``kernels.hopper``), with
    ``pointer`` the element type of the hidden states and weights (``*bf16``, ``*fp16``, ``*fp32``):
    the types the launches below pass."""
    strides4 = {"stride_hn": "i32", "stride_hk": "i32", "stride_wv": "i32", "stride_wk": "i32"}
    return {
        _logit_stats_kernel: {"hidden_ptr": pointer, "weight_ptr": pointer, "labels_ptr": "*i64", "max_ptr": "*fp32",
                              "sumexp_ptr": "*fp32", "target_ptr": "*fp32", "num_tokens": "i32", "vocab_size": "i32",
                              "hidden_size": "i32", "tiles_per_split": "i32", **strides4},
        _grad_logits_kernel: {"hidden_ptr": pointer, "weight_ptr": pointer, "labels_ptr": "*i64", "lse_ptr": "*fp32",
                              "grad_ptr": "*fp32", "out_ptr": pointer, "num_tokens": "i32", "vocab_size": "i32",
                              "hidden_size": "i32", "label_offset": "i32", **strides4, "stride_on": "i32",
                              "stride_ov": "i32"},
        _matmul_accumulate_kernel: {"a_ptr": pointer, "b_ptr": pointer, "c_ptr": "*fp32", "M": "i32", "N": "i32",
                                    "K": "i32", "stride_am": "i32", "stride_ak": "i32", "stride_bk": "i32",
                                    "stride_bn": "i32", "stride_cm": "i32", "stride_cn": "i32"},
    }


def kernel_constants(cfg: LaunchConfig, dtype: torch.dtype) -> dict:
    """The compile-time arguments of the tiles of ``cfg``, per kernel (the matmul names its tiles M/N)."""
    shared = _shared_constants(cfg, dtype)
    return {_logit_stats_kernel: {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, **shared},
            _grad_logits_kernel: {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, **shared},
            _matmul_accumulate_kernel: {"BLOCK_M": cfg.block_n, "BLOCK_N": cfg.matmul_block_n or cfg.block_v,
                                        **shared}}


def logit_stats(hidden, weight, labels_here, *, token_chunk, vocab_chunk):
    """Same contract as the chunked ``logit_stats``; the chunk sizes do not apply (no tile is stored)."""
    del token_chunk, vocab_chunk
    num_tokens, hidden_size = hidden.shape
    vocab_local = weight.shape[0]
    cfg = launch_config(hidden.device, hidden.dtype)
    token_blocks = triton.cdiv(num_tokens, cfg.block_n)
    num_tiles = triton.cdiv(vocab_local, cfg.block_v)
    splits = min(num_tiles, max(1, triton.cdiv(cfg.min_programs, token_blocks)))
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)  # so that no split is left without a tile
    partial = torch.empty(3, splits, num_tokens, dtype=torch.float32, device=hidden.device)
    _logit_stats_kernel[(token_blocks, splits)](
        hidden, weight, labels_here, partial[0], partial[1], partial[2],
        num_tokens, vocab_local, hidden_size, tiles_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, **_kernel_args(cfg, hidden.dtype))
    row_max, row_sumexp = merge_partial_stats(partial[0], partial[1])
    return row_max, row_sumexp, partial[2].sum(dim=0)  # the label logit is in one split, 0 elsewhere


def _accumulate_matmul(c, a, b, cfg: LaunchConfig):
    """``c += a @ b`` with ``c`` fp32 ``[M, N]``; ``a``, ``b`` may be transposed views."""
    (m, k), n = a.shape, b.shape[1]
    block_m, block_n = cfg.block_n, cfg.matmul_block_n or cfg.block_v
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _matmul_accumulate_kernel[grid](
        a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, **_kernel_args(cfg, a.dtype))


def logit_grads(hidden, weight, labels_here, lse, grad_logprob, *, token_chunk, vocab_chunk,
                need_hidden=True, need_weight=True):
    """Same contract as the chunked ``logit_grads``: vocabulary outer, tokens inner, logits recomputed.

    The logits' gradient of a block goes through one ``[token_chunk, vocab_chunk]`` buffer in the
    input dtype, the largest thing allocated besides the gradients themselves (and, for bf16/fp16,
    one ``[vocab_chunk, H]`` fp32 accumulator).
    """
    num_tokens, hidden_size = hidden.shape
    vocab_local = weight.shape[0]
    cfg = launch_config(hidden.device, hidden.dtype)
    fp32 = torch.float32
    grad_hidden = torch.zeros(hidden.shape, dtype=fp32, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    buffer = torch.empty(min(token_chunk, num_tokens), min(vocab_chunk, vocab_local),
                         dtype=hidden.dtype, device=hidden.device)
    weight_acc = None
    if need_weight and weight.dtype != fp32:
        weight_acc = torch.empty(min(vocab_chunk, vocab_local), hidden_size, dtype=fp32, device=weight.device)
    for v0 in range(0, vocab_local, vocab_chunk):
        weight_chunk = weight[v0:v0 + vocab_chunk]
        width = weight_chunk.shape[0]
        if need_weight:
            # fp32 weights accumulate straight into their gradient.
            acc = grad_weight[v0:v0 + width] if weight_acc is None else weight_acc[:width]
            acc.zero_()
        for t0 in range(0, num_tokens, token_chunk):
            hidden_chunk = hidden[t0:t0 + token_chunk]
            height = hidden_chunk.shape[0]
            grad_logits = buffer[:height, :width]
            grid = (triton.cdiv(height, cfg.block_n), triton.cdiv(width, cfg.block_v))
            _grad_logits_kernel[grid](
                hidden_chunk, weight_chunk, labels_here[t0:t0 + height], lse[t0:t0 + height],
                grad_logprob[t0:t0 + height], grad_logits,
                height, width, hidden_size, v0,
                hidden_chunk.stride(0), hidden_chunk.stride(1), weight_chunk.stride(0), weight_chunk.stride(1),
                grad_logits.stride(0), grad_logits.stride(1),
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, **_kernel_args(cfg, hidden.dtype))
            if need_hidden:
                _accumulate_matmul(grad_hidden[t0:t0 + height], grad_logits, weight_chunk, cfg)
            if need_weight:
                _accumulate_matmul(acc, grad_logits.T, hidden_chunk, cfg)
        if weight_acc is not None:
            grad_weight[v0:v0 + width] = acc
    return grad_hidden, grad_weight


# The backward buffer [8192, 8192] in bf16 is 128 MiB; the forward stores no tile at all.
TRITON = Backend("triton", logit_stats, logit_grads, token_chunk=8192, vocab_chunk=8192)
