"""Model FLOPs, throughput and MFU.

FLOPs are counted from the config and the batch's actual shapes, as the matmuls the model runs
(2 x multiply-adds):

- SigLIP, per image of T patches: patch embedding (a ``3 p^2 -> D`` matmul per patch), per layer the
  q/k/v/out projections (4 x T D^2), the MLP (2 x T D I) and attention (QK^T and AV: 2 x T^2 D).
- Projector, per image: ``T (D_v D_l + D_l^2)``.
- Qwen2, per token: per layer q and o (2 H^2), k and v (2 H H_kv), the SwiGLU MLP (3 H I); attention
  per layer 2 x (attended query-key pairs) x H, where a packed causal segment of n tokens has
  n (n + 1) / 2 pairs (what a causal varlen/flash kernel computes; ``attention="dense"`` counts
  every pair of each row, as a dense mask does); the head (H V) only for labelled positions, which
  is all the fused log-prob kernel computes.
- Backward costs twice the forward for every part gradients flow through (input and weight
  gradients), and nothing for a frozen vision tower that nothing upstream needs gradients from.

MFU is model FLOPs per second per device over the device's dense peak for the training dtype
(``PEAK_TFLOPS``: vendor figures without sparsity). Recomputation from activation checkpointing
is not counted (it is not model work), so MFU is the same with or without it.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .config import ModelConfig

# Dense (no sparsity) peak TFLOP/s by device-name fragment and dtype, from the vendors' datasheets.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 66.9},
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 66.9},
    "H100 80GB HBM3": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "fp8": 1670.9, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


def peak_tflops(device_name: str, dtype: str = "bf16") -> float | None:
    """The dense peak for ``device_name`` (``torch.cuda.get_device_name()``), or None if unknown."""
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in device_name:
            return peaks.get(dtype)
    return None


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one step, by part (forward and backward together)."""

    vision: float
    projector: float
    language: float
    attention: float
    head: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.language + self.attention + self.head


def attended_pairs(segment_lengths: list[int], *, causal: bool = True) -> int:
    """Query-key pairs attention computes over packed segments of these lengths."""
    if causal:
        return sum(n * (n + 1) // 2 for n in segment_lengths)
    return sum(n * n for n in segment_lengths)


def forward_flops(config: ModelConfig, *, num_images: int, num_tokens: int, attention_pairs: int,
                  num_labels: int) -> StepFlops:
    """Forward FLOPs for a batch of ``num_images`` images and ``num_tokens`` decoder tokens."""
    v, lang = config.vision, config.language
    patches = (v.image_size // v.patch_size) ** 2
    d, i = v.hidden_size, v.intermediate_size
    per_layer = 2 * patches * (4 * d * d + 2 * d * i) + 2 * 2 * patches * patches * d
    vision = num_images * (2 * patches * v.num_channels * v.patch_size ** 2 * d + v.num_layers_built * per_layer)
    projector = num_images * 2 * patches * (d * lang.hidden_size + lang.hidden_size ** 2)
    h, kv = lang.hidden_size, lang.num_key_value_heads * lang.head_dim
    per_token = 2 * (2 * h * h + 2 * h * kv + 3 * h * lang.intermediate_size)
    language = num_tokens * lang.num_hidden_layers * per_token
    attention = lang.num_hidden_layers * 2 * 2 * attention_pairs * h
    head = 2 * num_labels * h * lang.vocab_size
    return StepFlops(float(vision), float(projector), float(language), float(attention), float(head))


def step_flops(config: ModelConfig, *, num_images: int, num_tokens: int, attention_pairs: int, num_labels: int,
               trainable: tuple[str, ...] = ("vision", "projector", "language")) -> StepFlops:
    """Forward + backward FLOPs of one training step (see the module docstring for the rules)."""
    fwd = forward_flops(config, num_images=num_images, num_tokens=num_tokens, attention_pairs=attention_pairs,
                        num_labels=num_labels)
    # Gradients always flow back through the decoder (the loss is there) and the projector's input
    # needs none unless the vision tower trains.
    vision_factor = 3 if "vision" in trainable else 1
    return StepFlops(vision=fwd.vision * vision_factor, projector=fwd.projector * 3, language=fwd.language * 3,
                     attention=fwd.attention * 3, head=fwd.head * 3)


class ThroughputMeter:
    """Tokens/s, TFLOP/s per device and MFU over a logging interval; also the data-wait fraction."""

    def __init__(self, num_devices: int, peak_tflops_per_device: float | None):
        self.num_devices, self.peak = num_devices, peak_tflops_per_device
        self.reset()

    def reset(self) -> None:
        self._start = time.perf_counter()
        self.tokens, self.flops, self.data_wait = 0, 0.0, 0.0

    def add_step(self, tokens: int, flops: float, data_wait_s: float = 0.0) -> None:
        self.tokens += tokens
        self.flops += flops
        self.data_wait += data_wait_s

    def summary(self) -> dict:
        """Numbers for the interval since the last reset (then call ``reset``)."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tflops = self.flops / elapsed / self.num_devices / 1e12
        return {"tokens_per_s": self.tokens / elapsed, "tokens_per_s_per_device": self.tokens / elapsed / self.num_devices,
                "tflops_per_device": tflops, "mfu": tflops / self.peak if self.peak else None,
                "data_wait_fraction": self.data_wait / elapsed,
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
