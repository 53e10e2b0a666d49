"""SigLIP vision tower (as ``SiglipVisionModel``), built only up to the selected feature layer.

Parameter names mirror the HF checkpoint (``embeddings.*``, ``layers.N.self_attn.q_proj`` ...), so
conversion is a prefix table. Layers after ``select_layer``, the post-layernorm and the pooling head
are never built: they cannot affect the features the projector sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .layers import attention


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values ``[N, C, H, W]`` → patch tokens ``[N, (H/p)*(W/p), D]``."""
        height, width = pixel_values.shape[-2:]
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        return patches + self.positions(height // self.patch_size, width // self.patch_size)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """Learned positions ``[1, rows*cols, D]``, bicubically resampled for other grid sizes."""
        table = self.position_embedding.weight
        side = int(round(table.shape[0] ** 0.5))
        if rows * cols == table.shape[0] and rows == cols:
            return table[None]
        grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)


class SiglipAttention(nn.Module):
    def __init__(self, config: VisionConfig, backend: str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.backend = backend
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[N, S, D]`` → q, k, v ``[N, S, D]`` (a fused TE layer replaces this)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(t, self.head_dim) for t in self.project_qkv(x))
        # Every image has the same number of patches, so the tower never needs a packed layout.
        out = attention(q, k, v, causal=False, backend="sdpa" if self.backend == "auto" else self.backend)
        return self.out_proj(out.flatten(2))


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[N, S, h * D]`` → ``[N, S, h, D]``; h from the width (a tensor-parallel rank has fewer heads),
    not -1, so an empty batch of images reshapes too."""
    return x.view(*x.shape[:-1], x.shape[-1] // head_dim, head_dim)


class SiglipMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, config: VisionConfig, backend: str):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config, backend)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVisionTower(nn.Module):
    def __init__(self, config: VisionConfig, *, attention_backend: str = "auto"):
        super().__init__()
        self.config = config
        self.embeddings = SiglipEmbeddings(config)
        self.layers = nn.ModuleList(
            SiglipEncoderLayer(config, attention_backend) for _ in range(config.num_layers_built))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values ``[N, C, H, W]`` (SigLIP-normalised) → features ``[N, num_patches, D]``."""
        x = self.embeddings(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return x
