"""Qwen2 / Qwen2.5 decoder: RMSNorm, GQA attention with qkv bias, RoPE, SwiGLU MLP.

Parameter names mirror HF ``Qwen2ForCausalLM`` without the ``model.`` prefix. With tied embeddings
there is no ``lm_head`` parameter: the head reads ``embed_tokens.weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LanguageConfig
from ..batch import PackedSeqs
from .layers import RMSNorm, apply_rope, attention, rope_cos_sin


class Qwen2Attention(nn.Module):
    def __init__(self, config: LanguageConfig, backend: str):
        super().__init__()
        self.head_dim = config.head_dim
        self.backend = backend
        dim, kv_dim = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, kv_dim, bias=True)
        self.v_proj = nn.Linear(dim, kv_dim, bias=True)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, S, H]`` → q ``[B, S, Hq*D]``, k and v ``[B, S, Hkv*D]`` (a fused TE layer replaces this)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                packed: PackedSeqs | None) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        shape = (batch, seqlen, -1, self.head_dim)
        q, k, v = self.project_qkv(x)
        q = apply_rope(q.view(shape), cos, sin)
        k = apply_rope(k.view(shape), cos, sin)
        v = v.view(shape)
        out = attention(q, k, v, causal=True, packed=packed, backend=self.backend)
        return self.o_proj(out.reshape(batch, seqlen, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, config: LanguageConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: LanguageConfig, backend: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(self, x, cos, sin, packed):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, packed)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2LanguageModel(nn.Module):
    def __init__(self, config: LanguageConfig, *, attention_backend: str = "auto"):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Keyed by layer index: a pipeline stage keeps a subset and every name stays the checkpoint's.
        self.layers = nn.ModuleDict(
            {str(i): Qwen2DecoderLayer(config, attention_backend) for i in range(config.num_hidden_layers)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)

    @property
    def head_weight(self) -> torch.Tensor:
        """``[V, H]`` output projection (the embedding table when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward_hidden(self, hidden: torch.Tensor, packed: PackedSeqs | None = None) -> torch.Tensor:
        """Token embeddings ``[B, S, H]`` (or, on a later pipeline stage, the hidden states before this
        stage's layers) → the hidden states after the layers this module holds, final-normed when it
        holds the norm. Positions come from ``packed``, or count from 0 in each row."""
        batch, seqlen, _ = hidden.shape
        positions = packed.position_ids if packed is not None else \
            torch.arange(seqlen, device=hidden.device).expand(batch, seqlen)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        for key, layer in self.layers.items():
            hidden = layer(hidden, cos, sin, packed)
        return self.norm(hidden) if self.norm is not None else hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[..., H]`` → logits ``[..., V]``."""
        return F.linear(hidden, self.head_weight)

    def forward(self, input_ids: torch.Tensor, packed: PackedSeqs | None = None) -> torch.Tensor:
        """Text-only forward: input_ids ``[B, S]`` → logits ``[B, S, V]``."""
        return self.logits(self.forward_hidden(self.embed_tokens(input_ids), packed))
