"""Model FLOPs, throughput and MFU; NVTX ranges and the profiling windows of a training run.

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

Profiling: ``nvtx_range`` marks phases for Nsight Systems (a no-op on CPU); ``StepProfiler`` opens
the windows of a ``ProfileConfig``: the nsys capture range (``cudaProfilerStart``/``Stop``, for
``tools/profile_nsys.sh``) and torch.profiler Chrome traces, which work on CPU too.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from pathlib import Path

import torch

from .config import ModelConfig

_log = logging.getLogger(__name__)

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


def attended_pairs(segment_lengths: list[int], *, causal: bool = True, prefix_lengths: list[int] | None = None) -> int:
    """Query-key pairs attention computes over packed segments of these lengths; ``prefix_lengths``
    (per segment, 0 for none): the shared prefix each segment's queries also attend to in full."""
    own = sum(n * (n + 1) // 2 for n in segment_lengths) if causal else sum(n * n for n in segment_lengths)
    return own + sum(n * p for n, p in zip(segment_lengths, prefix_lengths or ()))


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

    def exclude(self, seconds: float) -> None:
        """Leaves ``seconds`` of wall time (work that is not training) out of the interval."""
        self._start += seconds

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


# ----------------------------------------------------------------------------------------------
# NVTX ranges, the Nsight Systems capture window, torch profiler traces


class _NoRange:
    """The CPU (and disabled) stand-in for an NVTX range: enter and exit do nothing."""

    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class _NvtxRange:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.nvtx.range_pop()


_NO_RANGE = _NoRange()


@functools.cache
def _cuda_present() -> bool:
    return torch.cuda.is_available()


def nvtx_range(name: str, enabled: bool = True):
    """Context manager: an NVTX range ``name`` on CUDA machines (what Nsight Systems shows on its
    timeline), a shared no-op object on CPU or when ``enabled`` is False. Cost when no profiler is
    attached: a push and a pop (~1 us); the CUDA check is made once per process."""
    if enabled and _cuda_present():
        return _NvtxRange(name)
    return _NO_RANGE


@dataclasses.dataclass
class ProfileConfig:
    """What to profile in a training run; steps are the trainer's 1-based step numbers.

    nsys_steps: ``[start, end]``: ``cudaProfilerStart`` before step ``start`` and ``cudaProfilerStop``
        after step ``end``, for ``nsys profile --capture-range=cudaProfilerApi`` (tools/profile_nsys.sh).
        CUDA only: on CPU it is a ConfigError (there is nothing for Nsight Systems to capture).
    torch_steps: ``[start, end]``: a torch.profiler Chrome trace of those steps (CPU and CUDA), written
        to ``OUT/profile/torch_trace_rank<R>_steps<start>-<end>.json`` (chrome://tracing, Perfetto).
    nvtx: NVTX ranges per step (``step_<N>``) and around the step's phases, on CUDA.
    """

    nsys_steps: list[int] | None = None
    torch_steps: list[int] | None = None
    nvtx: bool = True

    def validate(self, where: str = "profile", device_type: str | None = None) -> "ProfileConfig":
        """Checks the step windows; with ``device_type``, also that they can run there."""
        from .config import ConfigError

        for name in ("nsys_steps", "torch_steps"):
            window = getattr(self, name)
            if window is None:
                continue
            if not (isinstance(window, (list, tuple)) and len(window) == 2
                    and all(isinstance(s, int) and not isinstance(s, bool) for s in window)):
                raise ConfigError(f"{where}.{name}: expected [start, end] (two step numbers), got {window!r}")
            start, end = window
            if not 1 <= start <= end:
                raise ConfigError(f"{where}.{name}: need 1 <= start <= end (steps count from 1), got {list(window)}")
        if not isinstance(self.nvtx, bool):
            raise ConfigError(f"{where}.nvtx: expected true/false, got {self.nvtx!r}")
        if device_type is not None and device_type != "cuda" and self.nsys_steps is not None:
            raise ConfigError(f"{where}.nsys_steps: Nsight Systems captures CUDA work and this run is on "
                              f"{device_type}; remove it, or use {where}.torch_steps for a torch profiler trace")
        return self


class StepProfiler:
    """Opens and closes the profiling windows of a ``ProfileConfig`` as the trainer's steps go by.

        profiler = StepProfiler(config.profile, out_dir, device_type, rank=rank)
        for step in ...:            # 1-based
            profiler.step_begin(step)
            ...                     # nvtx_range(...) / profiler.range(...) around phases
            profiler.step_end(step)
        profiler.close()            # also when the run stops early: an open window is closed and written

    Every rank captures (nsys writes one report per process; torch traces are named by rank).
    """

    def __init__(self, config: ProfileConfig, out_dir: str | os.PathLike, device_type: str, *, rank: int = 0):
        self.config = config.validate(device_type=device_type)
        self.out_dir = Path(out_dir) / "profile"
        self.device_type, self.rank = device_type, rank
        self._nsys_on = False
        self._torch = None
        self._step_ranges: list = []
        self.trace_paths: list[Path] = []

    def range(self, name: str):
        """An NVTX range (CUDA, if ``nvtx``) that also shows in the torch trace while one is recorded."""
        if self._torch is not None:
            return torch.profiler.record_function(name)
        return nvtx_range(name, self.config.nvtx)

    def step_begin(self, step: int) -> None:
        nsys, window = self.config.nsys_steps, self.config.torch_steps
        if nsys and step == nsys[0] and self.device_type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            self._nsys_on = True
        if window and step == window[0]:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device_type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
            self._torch.start()
        for context in (nvtx_range(f"step_{step}", self.config.nvtx),
                        torch.profiler.record_function(f"step_{step}") if self._torch is not None else None):
            if context is not None:
                context.__enter__()
                self._step_ranges.append(context)

    def step_end(self, step: int) -> None:
        while self._step_ranges:
            self._step_ranges.pop().__exit__(None, None, None)
        window, nsys = self.config.torch_steps, self.config.nsys_steps
        if self._torch is not None and window and step >= window[1]:
            self._write_torch_trace(window)
        if self._nsys_on and nsys and step >= nsys[1]:
            self._stop_nsys()

    def close(self) -> None:
        """Closes whatever is still open (a run that ended inside a window): the partial torch trace is
        written, the nsys capture stopped."""
        while self._step_ranges:
            self._step_ranges.pop().__exit__(None, None, None)
        if self._torch is not None:
            self._write_torch_trace(self.config.torch_steps)
        if self._nsys_on:
            self._stop_nsys()

    def _write_torch_trace(self, window) -> None:
        self._torch.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"torch_trace_rank{self.rank}_steps{window[0]}-{window[1]}.json"
        self._torch.export_chrome_trace(str(path))
        self._torch = None
        self.trace_paths.append(path)
        _log.info("profile: torch profiler trace of steps %d-%d written to %s", window[0], window[1], path)

    def _stop_nsys(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        self._nsys_on = False
