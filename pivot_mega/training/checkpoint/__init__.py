"""Checkpoints of a training run, one file per job.

  dcp.py           training checkpoints: sharded DCP save and resume (model, optimizer, scheduler, RNG)
  dcp_metadata.py  DCP's pickled .metadata read admitting only the classes DCP writes
  portable.py      portable safetensors model checkpoints into and out of a parallelised model
  stages.py        this rank's stage modules seen as one module under the whole model's names
  ranks.py         ranks agreeing on errors, per-rank RNG state, atomic file writes
"""

from .dcp import LoadedCheckpoint, PendingSave, async_save_group, load_checkpoint, resolve_resume, save_checkpoint
from .portable import export_model, load_model_weights

__all__ = ["LoadedCheckpoint", "PendingSave", "async_save_group", "export_model", "load_checkpoint",
           "load_model_weights", "resolve_resume", "save_checkpoint"]
