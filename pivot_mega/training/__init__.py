"""Training: the PIVOT stages' losses, optimisation and checkpoints."""

from .checkpoint import (LoadedCheckpoint, PendingSave, export_model, load_checkpoint, load_model_weights,
                         resolve_resume, save_checkpoint)
from .losses import DPOConfig, RunningRewardMean, dpo_loss, dpo_metric_names, loss_parts, sequence_logprob_sums
from .optim import (PIVOT_STAGE_DEFAULTS, TOWERS, OptimConfig, WarmupCosineLR, apply_trainable, build_optimizer,
                    build_scheduler, clip_grad_norm_, decays, param_groups, tied_embedding_copies, tower_of)

__all__ = [
    "LoadedCheckpoint", "PendingSave", "export_model", "load_checkpoint", "load_model_weights", "resolve_resume",
    "save_checkpoint",
    "DPOConfig", "RunningRewardMean", "dpo_loss", "dpo_metric_names", "loss_parts", "sequence_logprob_sums",
    "PIVOT_STAGE_DEFAULTS", "TOWERS", "OptimConfig", "WarmupCosineLR", "apply_trainable", "build_optimizer",
    "build_scheduler", "clip_grad_norm_", "decays", "param_groups", "tied_embedding_copies", "tower_of",
]
