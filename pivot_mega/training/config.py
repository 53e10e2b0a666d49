"""The run config of ``pivot-mega train``: one YAML file, one section per concern.

    stage: dpo                       # pretrain_projector | pretrain_full | sft | dpo
    init_from: runs/stage1b/final    # a portable checkpoint (convert import-hf, a finished stage)
    model: ../model_pivot_so400m_qwen2.5_1.5b.yaml   # optional with init_from (its config.json)
    parallel: {tensor_model_parallel_size: 2, ...}
    data: {shards: data/mmpr_shards, tokenizer: ckpt/qwen, mode: dpo, max_seq_len: 4096}
    optim: {lr: 1e-6, ...}           # unset keys take PIVOT's defaults for the stage
    dpo: {beta: 0.1, reference: online}
    train: {out_dir: runs/dpo, global_batch_size: 256, epochs: 3}
    precision: {backend: torch, fp8: none}
    profile: {torch_steps: [5, 7]}

``--set section.key=value`` overrides any key. The model section may name a preset file (relative to
the config file, as in model configs); every other path (``init_from``, ``data.shards``, ``train.out_dir``,
...) is taken relative to the current directory, like any command-line path.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, ModelConfig, apply_overrides, from_dict, inline_presets, load_yaml, to_dict
from ..data.config import DataConfig
from ..data.tokenizer import check_tokenizer_dir
from ..eval.config import EvalConfig
from ..parallel.config import ParallelConfig
from ..precision import PrecisionConfig
from ..profiling import ProfileConfig
from .losses import DPOConfig
from .optim import PIVOT_STAGE_DEFAULTS, TOWERS, OptimConfig

Stage = Literal["pretrain_projector", "pretrain_full", "sft", "dpo"]
STAGES = ("pretrain_projector", "pretrain_full", "sft", "dpo")


@dataclasses.dataclass
class DPOTrainConfig(DPOConfig):
    """The preference loss (see ``DPOConfig``) and where the reference log-probs come from.

    - ``reference: online``: a frozen copy of the initial model, sharded like the policy, runs a
      forward pass (no gradient, no optimizer state) on every step's pairs.
    - ``reference: precomputed``: the reference log-probs of every pair are read from
      ``reference_logps`` (a JSON file keyed by pair id). ``precompute_reference: true`` first
      writes that file with one reference pass over the data, then trains reading it: with 3
      epochs one reference pass instead of three, whatever ``reference`` says (the run says so).
      A pair missing from the file is an error.
    - ``reference_from``: the reference model's portable checkpoint (default: ``init_from``, the model
      the policy starts from, as in PIVOT).
    """

    reference: Literal["online", "precomputed"] = "online"
    precompute_reference: bool = False
    reference_logps: str = ""  # default: OUT/reference_logps.json
    reference_from: str = ""

    def validate(self, where: str = "dpo") -> "DPOTrainConfig":
        super().validate(where)
        return self

    @property
    def reads_precomputed(self) -> bool:
        """Whether training reads the reference log-probs from the file (written first if asked)."""
        return self.reference == "precomputed" or self.precompute_reference


WandbMode = Literal["online", "offline", "disabled"]
WANDB_MODES = ("online", "offline", "disabled")


@dataclasses.dataclass
class WandbConfig:
    """Weights & Biases logging on rank 0 (``pip install 'pivot-mega[wandb]'``): every step's metrics under
    their ``metrics.jsonl`` / TensorBoard names, the resolved run config as the W&B config. A resumed run
    continues the W&B run its checkpoint names. ``offline`` writes only DIR/wandb (``wandb sync`` it later)."""

    mode: WandbMode = "disabled"
    project: str = "pivot-mega"
    entity: str = ""  # default: the W&B account's default entity
    name: str = ""  # default: a name W&B picks
    dir: str = ""  # W&B writes DIR/wandb/; default: train.out_dir

    def validate(self, where: str = "train.wandb") -> "WandbConfig":
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"{where}.mode: {self.mode!r} is not one of {list(WANDB_MODES)}")
        return self

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"


def import_wandb(where: str = "train.wandb"):
    """The ``wandb`` module, or a ConfigError that says how to install it (it is an optional extra)."""
    try:
        return importlib.import_module("wandb")
    except ImportError as e:
        raise ConfigError(f"{where}: W&B logging needs the wandb package ({e}); pip install 'pivot-mega[wandb]'") \
            from None


@dataclasses.dataclass
class TrainConfig:
    """The loop: batch size, length, checkpoints, logging, what trains."""

    out_dir: str = "runs/pivot"
    # Towers that train (vision, projector, language): a list, or one tower as a string; empty: the
    # stage's PIVOT default.
    trainable: list = dataclasses.field(default_factory=list)
    # Samples per optimizer step over all ranks (DPO: pairs). A step takes loader micro-batches until
    # the global batch holds at least this many; the count is logged. PIVOT: 256.
    global_batch_size: int = 256
    epochs: int = 1
    # Stop after this many steps (0: run the epochs). Also the length of the LR schedule.
    max_steps: int = 0
    seed: int = 0
    log_every: int = 1
    # Checkpoint every N steps (0: only at the end and on a signal).
    save_every: int = 500
    keep_last: int = 3
    async_save: bool = False
    # auto: resume from OUT/checkpoints/latest when there is one; none: start fresh; or a checkpoint path.
    resume: str = "auto"
    # With resume auto, a newest checkpoint that fails its checks (checksums, manifest, metadata) is
    # passed over, with a warning, for the newest good one; false: such a run stops with the error.
    resume_fallback: bool = True
    # Steps with a non-finite loss or gradient norm are skipped; this many in a row stop the run.
    max_bad_steps: int = 10
    # At the end: OUT/final (portable checkpoint, the next stage's init_from) always; with export_hf
    # also OUT/hf/llava (LlavaForConditionalGeneration) and OUT/hf/siglip (the vision encoder).
    export_hf: bool = False
    tensorboard: bool = True
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)
    # Progress bar on rank 0 (on a terminal; otherwise one line per log interval).
    progress: bool = True

    def validate(self, where: str = "train") -> "TrainConfig":
        for name in ("global_batch_size", "epochs", "log_every", "keep_last", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("max_steps", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")
        if isinstance(self.trainable, str):  # `--set train.trainable=vision`: one tower, not its letters
            self.trainable = [self.trainable]
        if not isinstance(self.trainable, list) or not all(isinstance(t, str) for t in self.trainable):
            raise ConfigError(f"{where}.trainable: expected a tower or a list of towers of {list(TOWERS)}, "
                              f"got {self.trainable!r}")
        unknown = sorted(set(self.trainable) - set(TOWERS))
        if unknown:
            raise ConfigError(f"{where}.trainable: unknown tower(s) {unknown}; the towers are {list(TOWERS)}")
        if not self.out_dir:
            raise ConfigError(f"{where}.out_dir: name the run's output directory")
        if Path(self.out_dir).is_file():
            raise ConfigError(f"{where}.out_dir: {self.out_dir} is a file, not a directory")
        self.wandb.validate(f"{where}.wandb")
        return self


@dataclasses.dataclass
class RunConfig:
    stage: Stage = "dpo"
    init_from: str = ""
    model: ModelConfig | None = None
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    dpo: DPOTrainConfig = dataclasses.field(default_factory=DPOTrainConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    @property
    def trainable(self) -> list[str]:
        return list(self.train.trainable) or list(PIVOT_STAGE_DEFAULTS[self.stage]["trainable"])

    @property
    def reference_logps_path(self) -> Path:
        return Path(self.dpo.reference_logps or Path(self.train.out_dir) / "reference_logps.json")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(to_dict(self), default=str))


def load_run_config(source: str | os.PathLike | dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    """A validated RunConfig from a YAML file (or a mapping) with ``key=value`` overrides."""
    base_dir, where = None, "run config"
    if isinstance(source, dict):
        data = json.loads(json.dumps(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"run config {path} does not exist")
        data, base_dir, where = load_yaml(path), path.parent, str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a run config must be a mapping of sections")
    for item in overrides:
        if isinstance(data.get("model"), (str, dict)):
            data["model"] = inline_presets(ModelConfig, data["model"], base_dir)
        apply_overrides(data, [item])
    stage = data.get("stage", "dpo")
    if stage not in STAGES:
        raise ConfigError(f"{where}: stage {stage!r} is not one of {list(STAGES)}")
    # PIVOT's learning rates for the stage, under whatever the file and overrides set.
    optim = data.get("optim") or {}
    if not isinstance(optim, dict):
        raise ConfigError(f"{where}: optim must be a mapping")
    defaults = {k: v for k, v in PIVOT_STAGE_DEFAULTS[stage].items() if k != "trainable"}
    data["optim"] = {**defaults, **optim}
    model = data.pop("model", None)
    config = from_dict(RunConfig, data, where=where, base_dir=base_dir)
    if model is not None:
        config.model = from_dict(ModelConfig, model, where=f"{where}: model", base_dir=base_dir)
    return validate_run_config(config, where)


def validate_run_config(config: RunConfig, where: str = "run config") -> RunConfig:
    if config.model is None and not config.init_from:
        raise ConfigError(f"{where}: give a model section (or preset file) or init_from (a checkpoint to start from)")
    if config.model is not None:
        config.model.validate()
    # the layout is checked against the model and the world when the mesh is built
    config.parallel.validate(f"{where}: parallel")
    config.data.validate(f"{where}: data")
    config.optim.validate(f"{where}: optim")
    config.dpo.validate(f"{where}: dpo")
    config.train.validate(f"{where}: train")
    config.precision.validate(f"{where}: precision")
    config.profile.validate(f"{where}: profile")
    config.eval.validate(f"{where}: eval")
    wants = "dpo" if config.stage == "dpo" else "lm"
    if config.data.mode != wants:
        raise ConfigError(f"{where}: stage {config.stage!r} reads data.mode {wants!r}, got {config.data.mode!r}")
    return config


def check_run_paths(config: RunConfig) -> RunConfig:
    """Checks the inputs a run reads exist, before any work (``load_run_config`` checks only the
    config itself, so that example configs naming other machines' paths still load)."""
    check_tokenizer_dir(config.data.tokenizer, "data.tokenizer")
    if config.train.wandb.enabled:  # on every rank, before any work (only rank 0 logs)
        import_wandb()
    return config
