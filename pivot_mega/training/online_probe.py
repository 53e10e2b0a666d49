"""Encoder probes while a run trains (``eval.probe``): the current vision tower and projector, probed
with ``pivot_mega.eval.probe`` every N steps, at step 0 and at the end.

How it runs on a parallel layout: every rank takes part in gathering the vision tower's and the
projector's tensors whole (``portable.gather_full_tensors``: FSDP and TP shards are all-gathered over
their meshes, one rank of the first pipeline stage sends them to rank 0); rank 0 loads them into an
unsharded copy of the two towers and runs the probes alone while the other ranks wait at a barrier.
The probe draws nothing from the training's random streams (they are saved and restored around it),
reads its own images, not the training data, and gives the same numbers at the same step after a
resume. Its time is reported apart (``probe/time_s``) and left out of tokens/s and MFU.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..eval.config import OnlineProbeConfig
from ..models.projector import Projector
from ..models.siglip import SiglipVisionTower
from .checkpoint.portable import gather_full_tensors

ENCODER_PREFIXES = ("vision.", "projector.")  # the tensors a probe needs


class EncoderView(nn.Module):
    """The vision tower and projector of a model, unsharded: what ``run_probes`` reads features from."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision = SiglipVisionTower(config.vision, attention_backend=config.attention)
        self.projector = Projector(config.projector, config.vision.hidden_size, config.language.hidden_size)


class OnlineProbe:
    """Probes the run's encoder; ``due(step)`` says when, ``run(pmodel, step)`` (all ranks) does it."""

    def __init__(self, config: OnlineProbeConfig, model_config: ModelConfig, *, total_steps: int, seed: int,
                 device: torch.device, is_main: bool):
        from ..eval.probe import check_same_classes, read_image_folder

        self.config, self.model_config, self.total_steps = config, model_config, total_steps
        self.seed, self.device, self.is_main = seed, device, is_main
        self.train = self.val = None
        if is_main:  # listed once; rank 0 alone reads images
            self.train = read_image_folder(config.train, per_class=config.per_class or None, seed=seed)
            self.val = read_image_folder(config.val)
            check_same_classes(self.train, self.val)

    def due(self, step: int) -> bool:
        return step == 0 or step == self.total_steps or step % self.config.every == 0

    def run(self, pmodel, step: int) -> dict[str, float]:
        """→ on rank 0 ``{probe/<features>/<probe>/top1: %, .../top5, probe/time_s}``, {} elsewhere."""
        started = time.perf_counter()
        tensors = gather_full_tensors(pmodel, keep=lambda name: name.startswith(ENCODER_PREFIXES))
        results: dict[str, float] = {}
        if self.is_main:
            results = self._probe(tensors)
            results["probe/time_s"] = round(time.perf_counter() - started, 3)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return results

    def _probe(self, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        from ..eval.probe import run_probes

        with _rng_untouched(self.device):  # building the towers draws their (overwritten) initial weights too
            encoder = EncoderView(self.model_config)
            missing, unexpected = encoder.load_state_dict(tensors, strict=False)
            if missing or unexpected:
                raise RuntimeError(f"online probe: the gathered encoder does not fit its config (missing "
                                   f"{missing[:5]}, unexpected {unexpected[:5]})")
            encoder = encoder.to(device=self.device, dtype=torch.float32).eval()
            rows = run_probes(encoder, self.train, self.val, kinds=self.config.features, probes=self.config.probes,
                              batch_size=self.config.batch_size, backend="python", seed=self.seed, progress=False)
        out = {}
        for row in rows:
            out[f"probe/{row['features']}/{row['probe']}/top1"] = row["top1"]
            out[f"probe/{row['features']}/{row['probe']}/top5"] = row["top5"]
        return out


class _rng_untouched:
    """Saves torch's (CPU and this device's), numpy's and python's global random states, restores them."""

    def __init__(self, device: torch.device):
        self.devices = [device] if device.type == "cuda" else []

    def __enter__(self):
        self._torch = torch.random.fork_rng(devices=self.devices)
        self._torch.__enter__()
        self._numpy, self._python = np.random.get_state(), random.getstate()

    def __exit__(self, *exc):
        np.random.set_state(self._numpy)
        random.setstate(self._python)
        return self._torch.__exit__(*exc)
