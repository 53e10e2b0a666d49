"""What trains and how: towers frozen or not, AdamW parameter groups, warmup + cosine, global-norm clipping.

    apply_trainable(pmodel, ["vision", "projector", "language"])
    optimizer = build_optimizer(pmodel.named_parameters(), config.optim, dims.device_type)
    scheduler = build_scheduler(optimizer, config.optim, total_steps)
    ...                                                      # forward_backward over the micro-batches
    norm = clip_grad_norm_(pmodel.parameters(), config.optim.max_grad_norm,
                           pp_group=dims.pp_group if dims.layout.pp > 1 else None,
                           tied_copies=tied_embedding_copies(pmodel))
    if torch.isfinite(norm): optimizer.step()                # the trainer's decision
    scheduler.step(); optimizer.zero_grad()

Works on plain modules and on the ``ParallelModel`` of ``pivot_mega.parallel`` alike: parameter names
are those of the unparallelised model whatever the layout (TP, FSDP and pipeline stages keep them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.lr_scheduler import LambdaLR

from ..config import ConfigError
from ..parallel import ParallelModel

TOWERS = ("vision", "projector", "language")

# PIVOT's per-stage choices (pivot-recipe.md, from its training scripts): which towers train and their
# peak learning rates. The trainer's stage defaults; OptimConfig's own defaults are the DPO stage's.
PIVOT_STAGE_DEFAULTS: dict[str, dict] = {
    "pretrain_projector": {"trainable": ["projector"], "lr": 1e-3},
    "pretrain_full": {"trainable": list(TOWERS), "lr": 1e-5, "vision_lr": 2e-6},
    "sft": {"trainable": list(TOWERS), "lr": 5e-6},
    "dpo": {"trainable": list(TOWERS), "lr": 1e-6},
}


@dataclasses.dataclass
class OptimConfig:
    """AdamW, its parameter groups, the schedule and clipping. Defaults: PIVOT's DPO stage.

    - ``lr``: peak learning rate (PIVOT DPO 1e-6; other stages in ``PIVOT_STAGE_DEFAULTS``).
      ``vision_lr`` / ``projector_lr``: that tower's own peak (None: ``lr``); PIVOT's stage 1b runs
      the ViT at 2e-6 under an LLM at 1e-5.
    - ``weight_decay``: 0 in every PIVOT stage. Where > 0 it spares biases and norm weights
      (see :func:`decays`).
    - ``betas``, ``eps``: AdamW's, at the Hugging Face Trainer defaults; PIVOT's scripts set neither.
    - ``warmup_ratio`` 0.03 and cosine decay to ``min_lr_ratio`` × peak (0: PIVOT's plain cosine).
    - ``max_grad_norm``: global L2 norm clipping at 1.0, the Hugging Face Trainer default, which
      PIVOT's scripts do not override as far as pivot-recipe.md reads them; 0 disables clipping.
    """

    lr: float = 1e-6
    vision_lr: float | None = None
    projector_lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self):
        # YAML gives a list; AdamW and the checkpointed config want the tuple.
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)

    def validate(self, where: str = "optim") -> "OptimConfig":
        for name in ("lr", "vision_lr", "projector_lr"):
            value = getattr(self, name)
            if value is None and name != "lr":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{where}.{name}: must be a number > 0, got {value!r}")
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2
                and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas)):
            raise ConfigError(f"{where}.betas: must be two numbers in [0, 1), got {self.betas!r}")
        checks = {"weight_decay": self.weight_decay >= 0, "eps": self.eps > 0,
                  "warmup_ratio": 0.0 <= self.warmup_ratio <= 1.0, "min_lr_ratio": 0.0 <= self.min_lr_ratio <= 1.0,
                  "max_grad_norm": self.max_grad_norm >= 0}
        ranges = {"weight_decay": ">= 0", "eps": "> 0", "warmup_ratio": "in [0, 1]", "min_lr_ratio": "in [0, 1]",
                  "max_grad_norm": ">= 0 (0: no clipping)"}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"{where}.{name}: must be {ranges[name]}, got {getattr(self, name)!r}")
        return self


# ----------------------------------------------------------------------------------------------
# what trains


def tower_of(name: str) -> str:
    """``vision.layers.3.self_attn.q_proj.bias`` → ``vision``; a name outside the towers is an error."""
    tower = name.split(".", 1)[0]
    if tower not in TOWERS:
        raise ValueError(f"parameter {name!r} belongs to none of the towers {list(TOWERS)}")
    return tower


def apply_trainable(model, trainable: Iterable[str]) -> None:
    """Sets ``requires_grad`` by tower: True on the towers named in ``trainable``, False elsewhere.

    ``model``: an ``nn.Module`` or a ``ParallelModel`` (a pipeline stage may hold only some towers).
    Frozen parameters then get no gradient and no optimizer state (:func:`build_optimizer` skips
    them), so they stay bitwise unchanged.
    """
    trainable = list(trainable)
    unknown = sorted(set(trainable) - set(TOWERS))
    if unknown:
        raise ValueError(f"trainable: unknown tower(s) {unknown}; the towers are {list(TOWERS)}")
    if not trainable:
        raise ValueError(f"trainable is empty: name at least one of {list(TOWERS)}")
    for name, param in model.named_parameters():
        param.requires_grad_(tower_of(name) in trainable)


def decays(name: str) -> bool:
    """Whether weight decay applies: not to biases (``*.bias``) nor norm weights (any name containing
    ``norm``: SigLIP's ``layer_norm1``/``post_layernorm``, Qwen2's ``input_layernorm``/``norm``).
    The Hugging Face Trainer spares the same (biases, LayerNorm/RMSNorm weights), and so does
    Megatron's default (every 1-D parameter: here exactly the biases and norm weights). Embeddings
    (token, patch, position) do decay, as in both."""
    return not (name.endswith(".bias") or "norm" in name)


# ----------------------------------------------------------------------------------------------
# optimizer


def param_groups(named_parameters: Iterable[tuple[str, torch.Tensor]], config: OptimConfig) -> list[dict]:
    """AdamW groups of the trainable parameters: one per (tower, decay or not, mesh).

    Each group carries its ``lr`` (the tower's peak), ``weight_decay`` and a ``name`` such as
    ``vision`` or ``vision.no_decay`` for logging. The mesh is part of the key because neither the
    fused nor the foreach kernels take a list that mixes plain tensors and DTensors ("got mixed
    torch.Tensor and DTensor", measured with tensor parallelism, which leaves norms and vision
    embeddings plain), and each group is one kernel call. Groups come in tower order, decayed first;
    never none: a rank with nothing to train (a pipeline stage of frozen towers) gets one empty
    group, so that it steps like the others.
    """
    tower_lr = {"vision": config.vision_lr or config.lr, "projector": config.projector_lr or config.lr,
                "language": config.lr}
    groups: dict[tuple, dict] = {}
    for name, param in named_parameters:
        tower = tower_of(name)
        if not param.requires_grad:
            continue
        decay = decays(name)
        mesh = param.device_mesh if isinstance(param, DTensor) else None
        key = (TOWERS.index(tower), not decay, mesh)
        if key not in groups:
            groups[key] = {"params": [], "name": tower if decay else f"{tower}.no_decay", "lr": tower_lr[tower],
                           "weight_decay": config.weight_decay if decay else 0.0}
        groups[key]["params"].append(param)
    if not groups:
        return [{"params": [], "name": "empty", "lr": config.lr, "weight_decay": 0.0}]
    # Stable sort: the meshes of one (tower, decay) keep the order the parameters met them in.
    return [group for key, group in sorted(groups.items(), key=lambda item: item[0][:2])]


def build_optimizer(named_parameters: Iterable[tuple[str, torch.Tensor]], config: OptimConfig,
                    device_type: str) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (``requires_grad``), grouped by :func:`param_groups`.

    CUDA: ``fused=True``. The fused kernel takes DTensor parameters (TP, FSDP2) since torch 2.4, when
    DTensor got sharding rules for ``_fused_adam(w)_`` (pytorch/pytorch#125369, and #126750 for the
    tensor learning rate, which closed "Fused AdamW not supported with FSDP2", #126670); this
    project needs torch >= 2.6, so fused is never traded for foreach on CUDA. Other devices:
    ``foreach=True``, the multi-tensor path (the default elsewhere would be the per-tensor loop).
    """
    config.validate()
    impl = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(named_parameters, config), lr=config.lr, betas=config.betas,
                             eps=config.eps, weight_decay=config.weight_decay, **impl)


# ----------------------------------------------------------------------------------------------
# schedule


class WarmupCosineLR(LambdaLR):
    """Linear warmup from 0 over ``ceil(warmup_ratio × total_steps)`` steps, then cosine decay to
    ``min_lr_ratio``; the factor multiplies each group's own peak lr (``initial_lr``).

    The same numbers as transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` (its
    ``get_cosine_schedule_with_warmup`` with ``min_lr_ratio`` 0), which PIVOT's Hugging Face Trainer
    ran: step ``s`` of the optimizer uses ``factor(s)``, so with warmup the first step has lr 0.

    The checkpointed state is the step count only. Peaks come from the config when the optimizer is
    built, so a checkpoint loads into a run whose layout splits the parameters into a different
    number of groups (:func:`param_groups` splits by mesh).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_ratio: float,
                 min_lr_ratio: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.warmup_steps = math.ceil(total_steps * warmup_ratio)
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        missing = sorted({"last_epoch", "_step_count"} - set(state_dict))
        if missing:
            raise KeyError(f"WarmupCosineLR state is missing {missing}; got keys {sorted(state_dict)}")
        self.last_epoch, self._step_count = int(state_dict["last_epoch"]), int(state_dict["_step_count"])
        lrs = [base * self.factor(self.last_epoch) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> WarmupCosineLR:
    return WarmupCosineLR(optimizer, total_steps=total_steps, warmup_ratio=config.warmup_ratio,
                          min_lr_ratio=config.min_lr_ratio)


# ----------------------------------------------------------------------------------------------
# clipping


def tied_embedding_copies(model) -> list[torch.Tensor]:
    """Parameters whose gradient duplicates another's: the last pipeline stage's copy of a tied
    embedding, which ``TiedEmbeddingSync`` gives the same summed gradient as the first stage's.
    Megatron marks it ``shared`` and leaves it out of the norm; pass these as ``tied_copies``."""
    return model.tied_head_copies() if isinstance(model, ParallelModel) else []


def _local_sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    norms = torch._foreach_norm(grads, 2.0)
    return torch.stack([n.double() for n in norms]).square().sum()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float | None, *, pp_group=None,
                    tied_copies: Iterable[torch.Tensor] = ()) -> torch.Tensor:
    """Scales gradients in place so that their global L2 norm is at most ``max_norm``; → the norm
    before scaling (fp32 scalar, the same on every rank).

    Global means every element of every gradient counted once, however it is spread: a DTensor
    gradient's local shard is summed over the mesh dims it is sharded on (FSDP, TP) and not over
    those it is replicated on; a ``Partial`` gradient (sequence-parallel norm weights) is reduced
    first; a plain gradient is whole and the same on every rank of its stage. Stages' sums of squares
    are then added over ``pp_group``. ``tied_copies`` are scaled but not counted
    (:func:`tied_embedding_copies`). torch's ``clip_grad_norm_`` knows nothing of pipeline stages,
    and under tensor parallelism, which leaves some parameters plain, it stops with "got mixed
    torch.Tensor and DTensor" (measured, foreach or not).

    A non-finite norm is returned as is and the gradients are left unscaled: the trainer skips the
    step. ``max_norm`` None or 0 only measures.
    """
    parameters = list(parameters)
    tied = {id(p) for p in tied_copies}
    grads = [p.grad for p in parameters if p.grad is not None]
    counted = [p.grad for p in parameters if p.grad is not None and id(p) not in tied]
    if grads:
        device = grads[0].device
    else:
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        device = parameters[0].device if parameters else torch.device(accelerator or "cpu")

    plain, sharded = [], {}
    for grad in counted:
        if not isinstance(grad, DTensor):
            plain.append(grad)
            continue
        if any(p.is_partial() for p in grad.placements):
            grad = grad.redistribute(grad.device_mesh, [Replicate() if p.is_partial() else p
                                                        for p in grad.placements])
        # Not ``is_shard()``: FSDP over TP shards with ``_StridedShard``, which answers False to it.
        shard_dims = tuple(i for i, p in enumerate(grad.placements) if not p.is_replicate())
        sharded.setdefault((grad.device_mesh, shard_dims), []).append(grad.to_local())

    total = torch.zeros((), dtype=torch.float64, device=device)
    if plain:
        total += _local_sum_of_squares(plain)
    # Same parameters, same order on every rank of a stage, so every rank issues the same collectives.
    for (mesh, shard_dims), local in sharded.items():
        squares = _local_sum_of_squares(local)
        for dim in shard_dims:
            dist.all_reduce(squares, group=mesh.get_group(dim))
        total += squares
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    total_norm = total.sqrt().float()

    if max_norm and grads:
        # No host sync: a non-finite norm turns into a factor of 1.
        scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        scale = torch.where(torch.isfinite(total_norm), scale, torch.ones_like(scale))
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        for device_grads in _by_device(local).values():
            torch._foreach_mul_(device_grads, scale.to(device_grads[0].device))
    return total_norm


def _by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    out: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault(t.device, []).append(t)
    return out
