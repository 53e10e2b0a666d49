"""Shared building blocks: attention backends, RMSNorm, rotary embeddings.

Attention takes q, k, v as ``[B, S, H, D]`` and returns ``[B, S, Hq, D]``. A packed batch holds several
samples per row; its ``batch.PackedSeqs`` says who attends to whom (segments, and shared prefixes),
and each backend turns that into its own form: SDPA a dense mask, flex_attention a mask function,
the varlen kernels q/k cu_seqlens. Every backend gives the same numbers; ``auto`` picks the fastest
one this machine has that can express the layout.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import PackedSeqs


class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot run here (not installed, no GPU, unsupported input)."""


# ----------------------------------------------------------------------------------------------
# Attention backends


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device``, fastest first (the order ``auto`` uses)."""
    device = torch.device(device)
    names = []
    if device.type == "cuda":
        if _has_module("flash_attn"):
            names.append("flash_attn")
        if _varlen_available():
            names.append("varlen")
        if _has_module("transformer_engine"):
            names.append("te")
    names.append("sdpa")
    names.append("sdpa_segments")
    if _flex_available():
        # flex_attention runs anywhere, but is only fast when compiled on CUDA.
        names.append("flex")
    return names


# Backends that take one cu_seqlens for queries and keys: a segment's keys must be its own tokens. (The
# varlen kernels take separate query and key cu_seqlens, so a branch's queries meet its prefix's keys.)
SEGMENTS_ONLY = ("te",)


# The CPU cost of a packed batch's attention (forward + backward), in units of one (query, key) pair of
# the dense-mask SDPA (``sdpa``), which costs rows * S^2 of them. Per segment (``sdpa_segments``) each
# SDPA call costs a fixed SEGMENT_CALL_PAIRS (about 0.3 ms), each token SEGMENT_TOKEN_PAIRS (its slices
# and the concatenation) and each of the segment's own pairs SEGMENT_PAIR_COST (causal SDPA skips the
# upper half). Fitted by least squares to ``tools/bench_attention.py`` (4 heads of 32, 2 threads, 12
# layouts from 2 to 64 segments a row of 256 to 4096 tokens; the rule picked the faster path in all 12).
# The estimate depends on the layout only, so every rank, thread count and tensor-parallel split of a
# batch picks the same backend.
SEGMENT_CALL_PAIRS = 17_000
SEGMENT_TOKEN_PAIRS = 240
SEGMENT_PAIR_COST = 0.5


def _segment_bounds(packed: PackedSeqs) -> tuple[list[int], list[int]]:
    """Each segment's query bounds and key bounds (its prefix's tokens then its own, gathered by
    ``key_index``; the query bounds where no segment has a prefix)."""
    bounds = packed.cu_seqlens.tolist()
    return bounds, (packed.cu_seqlens_k.tolist() if packed.key_index is not None else bounds)


def per_segment_pays(packed: PackedSeqs, rows: int, seqlen: int) -> bool:
    """Whether ``sdpa_segments`` is estimated faster than the dense mask on a CPU for this layout."""
    bounds, bounds_k = _segment_bounds(packed)
    own = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in zip(bounds, bounds[1:], bounds_k, bounds_k[1:]))
    per_segment = ((len(bounds) - 1) * SEGMENT_CALL_PAIRS + rows * seqlen * SEGMENT_TOKEN_PAIRS
                   + SEGMENT_PAIR_COST * own)
    return per_segment < rows * seqlen * seqlen


def resolve_backend(requested: str, device: torch.device | str, packed: bool, dtype: torch.dtype,
                    prefixes: bool = False, segments_pay: bool = False) -> str:
    """Maps ``requested`` (``auto`` or a name) to a backend that can run, or raises with the reason.

    ``packed``: the batch has a packed layout; ``prefixes``: some segment attends to a shared prefix;
    ``segments_pay``: ``per_segment_pays`` holds for it (``auto`` then takes ``sdpa_segments`` on a CPU).
    """
    device = torch.device(device)
    available = available_backends(device)
    if requested == "auto":
        if not packed:
            return "sdpa"  # dense causal/full attention: SDPA already dispatches to flash/cuDNN kernels
        if device.type == "cpu":
            return "sdpa_segments" if segments_pay else "sdpa"
        for name in available:
            if name in ("flash_attn", "te") and dtype not in (torch.float16, torch.bfloat16):
                continue
            if prefixes and name in SEGMENTS_ONLY:
                continue
            return name
        return "sdpa"
    if prefixes and requested in SEGMENTS_ONLY:
        raise AttentionBackendError(f"attention backend {requested!r} takes one cu_seqlens for queries and keys, "
                                    f"so it cannot express a shared prefix; use sdpa or flex (or auto)")
    if requested not in available:
        reason = {
            "flash_attn": "needs CUDA and the flash-attn package",
            "te": "needs CUDA and Transformer Engine",
            "varlen": "needs CUDA and torch.nn.attention.varlen (torch >= 2.10)",
            "flex": "needs torch.nn.attention.flex_attention",
        }.get(requested, "unknown backend")
        raise AttentionBackendError(
            f"attention backend {requested!r} is not available on {device} ({reason}); "
            f"available: {available}. Set model.attention: auto to pick one.")
    if requested in ("flash_attn", "te") and dtype not in (torch.float16, torch.bfloat16):
        raise AttentionBackendError(f"attention backend {requested!r} needs fp16/bf16 inputs, got {dtype}")
    return requested


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
              packed: PackedSeqs | None = None, backend: str = "auto") -> torch.Tensor:
    """Multi-head attention with GQA; q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` → ``[B, S, Hq, D]``."""
    prefixes = packed is not None and packed.has_prefixes
    segments_pay = (backend == "auto" and packed is not None and q.device.type == "cpu"
                    and per_segment_pays(packed, q.shape[0], q.shape[1]))
    name = resolve_backend(backend, q.device, packed is not None, q.dtype, prefixes, segments_pay)
    if name == "flex" and not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
        raise AttentionBackendError("attention backend 'flex' has no backward on the CPU in this torch "
                                    f"({torch.__version__}); train with sdpa (or auto) here, flex on CUDA")
    return _BACKENDS[name](q, k, v, causal, packed)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=-2)


def _sdpa(q, k, v, causal, packed):
    batch, seqlen = q.shape[:2]
    groups = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, _repeat_kv(k, groups), _repeat_kv(v, groups)))
    if packed is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=packed.attends(causal)[:, None])
    return out.transpose(1, 2)


def _sdpa_per_segment(q, k, v, causal, packed):
    """``sdpa_segments``: the dense-mask rule (``PackedSeqs.attends``) one segment at a time, each
    segment's queries against its keys (its prefix's tokens then its own: ``key_index`` /
    ``cu_seqlens_k``), causal aligned to the end of the keys, as the varlen kernels take them. On CPU a
    dense [S, S] mask costs every row S^2 whatever its segments: per segment was 2.9-7.0x faster for
    4-64 segments a row of 2048-4096 tokens, but each call has a fixed cost, and for rows of 256-512
    tokens the dense mask was 1.2-4.2x faster (``tools/bench_attention.py``, 2 threads). The same
    numbers as ``sdpa`` within fp32 rounding; ``auto`` picks it on a CPU where ``per_segment_pays``.
    q ``[B, S, Hq, D]``."""
    if packed is None:
        return _sdpa(q, k, v, causal, packed)
    batch, seqlen, heads, dim = q.shape
    groups = heads // k.shape[2]
    q, k, v = (t.reshape(batch * seqlen, t.shape[2], dim) for t in (q, _repeat_kv(k, groups), _repeat_kv(v, groups)))
    bounds, bounds_k = _segment_bounds(packed)
    if packed.key_index is not None:
        k, v = k[packed.key_index], v[packed.key_index]
    outs = []
    for q0, q1, k0, k1 in zip(bounds[:-1], bounds[1:], bounds_k[:-1], bounds_k[1:]):
        # [1, H, L, D]: with 3-D inputs this torch's CPU SDPA took a kernel half as fast
        qs, ks, vs = (t[None, a:b].transpose(1, 2) for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        mask = None
        if causal and k1 - k0 != q1 - q0:  # a branch: every prefix key, then its own causally
            mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device).tril(k1 - k0 - (q1 - q0))
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal and mask is None)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs).reshape(batch, seqlen, heads, dim)


def _flex(q, k, v, causal, packed):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, seqlen = q.shape[:2]
    if packed is not None:
        mask_mod = packed.mask_mod(causal)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx if causal else q_idx == q_idx

    block_mask = create_block_mask(mask_mod, batch, None, seqlen, seqlen, device=q.device)
    groups = q.shape[2] // k.shape[2]
    # Eager flex_attention materialises the scores; compiled (CUDA) it is a fused kernel.
    kernel = _compiled_flex() if q.is_cuda else flex_attention
    out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                         block_mask=block_mask, enable_gqa=groups > 1)
    return out.transpose(1, 2)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Automatic dynamic shapes (dynamic=None): a new shape recompiles once, into a kernel for any
    # length. dynamic=False recompiled at every new shape, and past dynamo's recompile limit fell
    # back to the eager kernel, which materialises the scores.
    return torch.compile(flex_attention)


@functools.cache
def _varlen_params() -> set[str]:
    from torch.nn.attention.varlen import varlen_attn

    return set(inspect.signature(varlen_attn).parameters)


def _flat_layout(q, packed):
    """(cu_seqlens, max_seqlen) of the varlen kernels: queries and keys share the segments."""
    batch, seqlen = q.shape[:2]
    if packed is None:
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=q.device)
        return cu, seqlen
    return packed.cu_seqlens.to(device=q.device, dtype=torch.int32), packed.max_seqlen


def varlen_inputs(q, k, v, packed):
    """Flattened ``(q, k, v, cu_q, cu_k, max_q, max_k)`` for the varlen kernels. With shared prefixes
    each segment's keys are its prefix's then its own (``packed.key_index``), so a branch's queries
    attend to both; causality is aligned to the end of each key run (flash-attn's convention)."""
    batch, seqlen = q.shape[:2]
    cu, max_len = _flat_layout(q, packed)
    flat = [t.reshape(batch * seqlen, t.shape[2], t.shape[3]) for t in (q, k, v)]
    if packed is None or not packed.has_prefixes:
        return (*flat, cu, cu, max_len, max_len)
    index = packed.key_index.to(q.device)
    return (flat[0], flat[1][index], flat[2][index], cu, packed.cu_seqlens_k.to(q.device), max_len,
            packed.max_seqlen_k)


def _varlen(q, k, v, causal, packed):
    from torch.nn.attention.varlen import varlen_attn

    batch, seqlen, heads, dim = q.shape
    params = _varlen_params()
    kwargs = {}
    groups = heads // k.shape[2]
    if groups > 1 and "enable_gqa" not in params:
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    elif groups > 1:
        kwargs["enable_gqa"] = True
    # torch 2.10/2.11 take is_causal; later releases express causality as a window.
    if "is_causal" in params:
        kwargs["is_causal"] = causal
    elif causal:
        kwargs["window_size"] = (-1, 0)
    out = varlen_attn(*varlen_inputs(q, k, v, packed), **kwargs)
    return out.view(batch, seqlen, heads, dim)


def _flash_attn(q, k, v, causal, packed):
    from flash_attn import flash_attn_varlen_func

    batch, seqlen, heads, dim = q.shape
    out = flash_attn_varlen_func(*varlen_inputs(q, k, v, packed), causal=causal)
    return out.view(batch, seqlen, heads, dim)


def _te(q, k, v, causal, packed):
    batch, seqlen, heads, dim = q.shape
    cu, max_len = _flat_layout(q, packed)
    module = _te_module(heads, k.shape[2], dim, causal)
    flat = [t.reshape(batch * seqlen, t.shape[2], dim) for t in (q, k, v)]
    out = module(*flat, qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                 max_seqlen_q=max_len, max_seqlen_kv=max_len)
    return out.view(batch, seqlen, heads, dim)


@functools.cache
def _te_module(heads: int, kv_heads: int, dim: int, causal: bool):
    import transformer_engine.pytorch as te

    # TE's attention holds no parameters; one instance per shape is reused.
    return te.DotProductAttention(heads, dim, num_gqa_groups=kv_heads, attention_dropout=0.0,
                                  attn_mask_type="padding_causal" if causal else "padding")


_BACKENDS = {"sdpa": _sdpa, "sdpa_segments": _sdpa_per_segment, "flex": _flex, "varlen": _varlen,
             "flash_attn": _flash_attn, "te": _te}


def reference_attention(q, k, v, *, causal: bool, packed: PackedSeqs | None = None) -> torch.Tensor:
    """Plain softmax(QK^T/sqrt(d))V, each segment separately; the oracle for backend tests."""
    batch, seqlen, heads, dim = q.shape
    groups = heads // k.shape[2]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim)
    if packed is None:
        packed = PackedSeqs.from_lengths([[seqlen]] * batch, device=q.device)
    scores = scores.masked_fill(~packed.attends(causal)[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


# ----------------------------------------------------------------------------------------------
# Norms and rotary embeddings


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32 (fp64 inputs: fp64), scaled by ``weight`` in the input dtype (as Qwen2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # fp32 at least (fp64 stays fp64)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int,
                 theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables ``[B, S, D]`` for positions ``[B, S]``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=position_ids.device).float() / head_dim))
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x [B, S, H, D]`` (half-split convention of Qwen2/Llama) in fp32 at least, back in x's dtype."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
