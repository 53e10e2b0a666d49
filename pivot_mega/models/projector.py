"""Vision → language projector (LLaVA's ``mlp2x_gelu``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ProjectorConfig


class Projector(nn.Module):
    """Linear → GELU (exact, erf) → Linear, both with biases; names as HF's ``multi_modal_projector``."""

    def __init__(self, config: ProjectorConfig, vision_dim: int, language_dim: int):
        super().__init__()
        if config.type != "mlp2x_gelu":
            raise ValueError(f"projector type {config.type!r} is not supported (only mlp2x_gelu)")
        self.linear_1 = nn.Linear(vision_dim, language_dim)
        self.linear_2 = nn.Linear(language_dim, language_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features ``[..., vision_dim]`` → ``[..., language_dim]``."""
        return self.linear_2(F.gelu(self.linear_1(features)))
