"""The ``eval`` section of a run config: encoder probes while the run trains.

    eval:
      probe: {train: data/probe/train, val: data/probe/val, every: 500, per_class: 50,
              probes: [prototype, logistic], features: [vit, projector]}
"""

from __future__ import annotations

import dataclasses

from ..config import ConfigError

PROBES = ("prototype", "logistic")
FEATURE_KINDS = ("vit", "projector")


@dataclasses.dataclass
class OnlineProbeConfig:
    """Every ``every`` steps, at step 0 and at the end, ``pivot_mega.eval.probe`` on ImageFolder data
    (``train`` / ``val``: one sub-folder per class) with the run's current encoder; 0: never."""

    train: str = ""
    val: str = ""
    every: int = 0
    # Training images per class (0: all); the validation folder is used whole.
    per_class: int = 0
    probes: list = dataclasses.field(default_factory=lambda: list(PROBES))
    features: list = dataclasses.field(default_factory=lambda: list(FEATURE_KINDS))
    batch_size: int = 32

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def validate(self, where: str = "eval.probe") -> "OnlineProbeConfig":
        if self.every < 0 or self.per_class < 0 or self.batch_size <= 0:
            raise ConfigError(f"{where}: every and per_class must be >= 0 and batch_size > 0, got {self.every}, "
                              f"{self.per_class}, {self.batch_size}")
        for name, value, choices in (("probes", self.probes, PROBES), ("features", self.features, FEATURE_KINDS)):
            if isinstance(value, str):
                value = [value]
                setattr(self, name, value)
            if not value or not isinstance(value, list) or set(value) - set(choices):
                raise ConfigError(f"{where}.{name}: choose from {list(choices)}, got {value!r}")
        if self.enabled and not (self.train and self.val):
            raise ConfigError(f"{where}: every={self.every} needs train and val (ImageFolder directories)")
        return self


@dataclasses.dataclass
class EvalConfig:
    probe: OnlineProbeConfig = dataclasses.field(default_factory=OnlineProbeConfig)

    def validate(self, where: str = "eval") -> "EvalConfig":
        self.probe.validate(f"{where}.probe")
        return self
