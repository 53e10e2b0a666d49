"""Training losses over per-token and per-sequence log-probs: SFT, and the DPO family for preference pairs.

    token_lp = token_logprobs(hidden, head_weight, mb.targets)             # [M], vocab-parallel
    sums, counts = sequence_logprob_sums(token_lp, mb.targets.sequence, 2 * P)  # [2P] per response
    # here pair p's chosen and rejected responses are sequences 2p and 2p + 1
    losses, metrics = dpo_loss(sums[0::2], sums[1::2], ref[0::2], ref[1::2],
                               counts[0::2], counts[1::2], config, reward_mean=running.mean)
    loss = losses.sum() * global_scale(num_global_pairs, dp_size)         # what backward sees

Everything here is a pure function of tensors except :class:`RunningRewardMean`, the one piece of
state (BCO-pair's reward baseline), which the trainer checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from ..config import ConfigError

LossType = Literal["sigmoid", "ipo", "hinge", "bco_pair", "mpo"]


@dataclasses.dataclass
class DPOConfig:
    """The preference loss. PIVOT: ``sigmoid``, beta 0.1, no label smoothing, no SFT term.

    ``h = log[π(c) / π_ref(c)] - log[π(r) / π_ref(r)]`` for chosen c and rejected r:

    - ``sigmoid``: DPO (Rafailov et al. 2023, eq. 7); ``label_smoothing`` ε > 0 gives conservative
      DPO as TRL implements it: ``(1 - ε) · L(h) + ε · L(-h)``, the loss under labels flipped with
      probability ε.
    - ``ipo``: IPO (Azar et al. 2023, eq. 17) ``(h - 1 / (2 beta))²``, with TRL's choice of log-probs
      averaged over each response's tokens instead of summed (so ``beta`` is IPO's τ on a per-token
      scale, and long responses do not dominate the squared margin).
    - ``hinge``: SLiC's ``max(0, 1 - beta · h)`` as in TRL.
    - ``bco_pair``: TRL's BCO on pairs: each response classified against a running reward mean δ,
      ``-log σ(r_c - δ) - log σ(-(r_r - δ))`` with ``r = beta · logratio``.
    - ``mpo``: InternVL's Mixed Preference Optimization, the recipe trained on MMPR:
      ``w_p · sigmoid + w_q · bco_pair + w_g · SFT``. The defaults 0.8 / 0.2 / 1.0 are InternVL's MPO
      scripts' ``--loss_type sigmoid,bco_pair --sigmoid_loss_weight 0.8 --bco_pair_loss_weight 0.2
      --rpo_alpha 1`` (OpenGVLab/InternVL internvl_chat/shell/internvl2.0_mpo/preference_optimization/
      internvl2_8b_internlm2_7b_dynamic_res_mpo_full.sh; weights applied in
      internvl_chat/internvl/train/trainer_dpo.py).

    ``sft_weight`` adds ``sft_weight × NLL per token of the chosen response`` to sigmoid / ipo / hinge /
    bco_pair; with ``mpo`` the generation term's weight is ``mpo_generation_weight`` instead. Each
    pair's term is normalised by its own response length, as MPO's generation loss is written; TRL's
    ``rpo_alpha`` (which InternVL uses) averages over all chosen tokens of a micro-batch instead,
    which would make the loss depend on how the batch is split.
    """

    loss_type: LossType = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    mpo_preference_weight: float = 0.8
    mpo_quality_weight: float = 0.2
    mpo_generation_weight: float = 1.0

    def validate(self, where: str = "dpo") -> "DPOConfig":
        if not self.beta > 0:
            raise ConfigError(f"{where}.beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{where}.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "mpo"):
            raise ConfigError(f"{where}.label_smoothing: {self.label_smoothing} has no meaning for loss_type "
                              f"{self.loss_type!r}; it smooths the sigmoid loss (loss_type sigmoid or mpo)")
        if self.sft_weight < 0:
            raise ConfigError(f"{where}.sft_weight: must be >= 0, got {self.sft_weight}")
        if self.loss_type == "mpo" and self.sft_weight:
            raise ConfigError(f"{where}.sft_weight: {self.sft_weight} with loss_type 'mpo'; MPO's SFT term is "
                              f"weighted by {where}.mpo_generation_weight")
        for name in ("mpo_preference_weight", "mpo_quality_weight", "mpo_generation_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")
        return self


# ----------------------------------------------------------------------------------------------
# per-token → per-sequence


def sequence_logprob_sums(token_logprobs: torch.Tensor, sequence_index: torch.Tensor,
                          num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums token log-probs per sequence: ``token_logprobs [M]``, ``sequence_index [M]`` → ``(sums [S],
    counts [S])`` with ``S = num_sequences``.

    ``token_logprobs`` is what ``parallel.token_logprobs`` returns (labelled positions of the packed
    micro-batch, row-major); ``sequence_index[i]`` is the sequence (response) that token i belongs
    to, in ``[0, S)``. A packed row holds many sequences, so this is a scatter-add, differentiable
    in ``token_logprobs``. ``counts`` (int64) are the response lengths in tokens; a sequence with no
    token gets sum 0 and count 0.
    """
    if token_logprobs.dim() != 1 or sequence_index.shape != token_logprobs.shape:
        raise ValueError(f"token_logprobs {tuple(token_logprobs.shape)} and sequence_index "
                         f"{tuple(sequence_index.shape)} must be 1-D and of the same length")
    if sequence_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sequence_index must hold integers, got {sequence_index.dtype}")
    # An index out of range would be a device-side assert on CUDA; one host sync per call names it here.
    if sequence_index.numel() and not 0 <= int(sequence_index.min()) <= int(sequence_index.max()) < num_sequences:
        raise ValueError(f"sequence_index holds values in [{int(sequence_index.min())}, "
                         f"{int(sequence_index.max())}], outside [0, {num_sequences}) (num_sequences)")
    index = sequence_index.long()
    sums = token_logprobs.new_zeros(num_sequences).index_add(0, index, token_logprobs)
    counts = torch.bincount(index, minlength=num_sequences)
    return sums, counts


# ----------------------------------------------------------------------------------------------
# preference pairs

# Per-pair metrics of every DPO loss, as dpo_loss returns them; the loss's parts come after them.
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "ref_logps/chosen", "ref_logps/rejected")


def loss_parts(config: DPOConfig) -> tuple[str, ...]:
    """The terms the configured loss sums: ``preference`` (sigmoid / ipo / hinge), ``quality``
    (BCO-pair), ``sft`` (a generation term with a non-zero weight)."""
    parts = []
    if config.loss_type != "bco_pair":
        parts.append("preference")
    if config.loss_type in ("bco_pair", "mpo"):
        parts.append("quality")
    if (config.mpo_generation_weight if config.loss_type == "mpo" else config.sft_weight):
        parts.append("sft")
    return tuple(parts)


def dpo_metric_names(config: DPOConfig, *, logged: bool = False) -> tuple[str, ...]:
    """Names of the per-pair metrics :func:`dpo_loss` returns for ``config``; with ``logged``, those a
    run logs (the loss's parts only when it is more than the preference loss alone)."""
    parts = loss_parts(config)
    if logged and parts == ("preference",):
        return PAIR_METRICS
    return PAIR_METRICS + tuple(f"loss/{part}" for part in parts)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
             config: DPOConfig, *, reward_mean: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss of the configured type, and per-pair metrics.

    Inputs are ``[P]`` for P pairs: summed log-probs of the chosen and rejected responses under the
    policy (with grad) and the frozen reference (treated as constants: detached), and the responses'
    token counts (>= 1; used by ``ipo`` and the SFT term). ``reward_mean`` is BCO-pair's δ, the
    :class:`RunningRewardMean` before this step (``bco_pair`` and ``mpo`` only).

    Returns ``losses [P]`` (normalise with ``parallel.global_scale``) and detached ``[P]`` metrics (:data:`PAIR_METRICS`):
    ``rewards/chosen`` and ``rewards/rejected`` (beta × policy-reference log-ratio, on the log-probs
    the loss uses: averaged per token for ``ipo``, summed otherwise), ``rewards/margins``,
    ``rewards/accuracies`` (1.0 where the chosen reward is strictly larger), ``logps/chosen``,
    ``logps/rejected``, ``ref_logps/chosen``, ``ref_logps/rejected`` (sums), and the loss's parts
    ``loss/preference``, ``loss/quality`` (BCO-pair), ``loss/sft`` where they enter it, unweighted.
    """
    named = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
             "reference_chosen": reference_chosen, "reference_rejected": reference_rejected,
             "chosen_tokens": chosen_tokens, "rejected_tokens": rejected_tokens}
    shapes = {name: tuple(t.shape) for name, t in named.items()}
    if policy_chosen.dim() != 1 or len(set(shapes.values())) != 1:
        raise ValueError(f"dpo_loss needs 1-D tensors of one length [P], got {shapes}")
    # Log-prob sums of long responses lose digits in bf16; every loss is formed in fp32 at least.
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    policy_c, policy_r = policy_chosen.to(dtype), policy_rejected.to(dtype)
    ref_c, ref_r = reference_chosen.detach().to(dtype), reference_rejected.detach().to(dtype)
    len_c, len_r = chosen_tokens.to(dtype), rejected_tokens.to(dtype)
    beta, loss_type = config.beta, config.loss_type

    if loss_type == "ipo":
        # TRL's IPO: log-probs averaged over each response's tokens.
        policy_c, policy_r, ref_c, ref_r = policy_c / len_c, policy_r / len_r, ref_c / len_c, ref_r / len_r
    chosen_logratio, rejected_logratio = policy_c - ref_c, policy_r - ref_r
    margin_logits = chosen_logratio - rejected_logratio  # h: the implicit reward margin over beta

    if loss_type == "mpo":
        weights = {"preference": config.mpo_preference_weight, "quality": config.mpo_quality_weight,
                   "sft": config.mpo_generation_weight}
    else:
        weights = {"preference": 1.0, "quality": 1.0, "sft": config.sft_weight}
    parts: dict[str, torch.Tensor] = {}
    for part in loss_parts(config):
        if part == "preference" and loss_type in ("sigmoid", "mpo"):
            eps = config.label_smoothing
            parts[part] = (-(1 - eps) * F.logsigmoid(beta * margin_logits)
                           - eps * F.logsigmoid(-beta * margin_logits))
        elif part == "preference" and loss_type == "ipo":
            parts[part] = (margin_logits - 1 / (2 * beta)) ** 2
        elif part == "preference":  # hinge
            parts[part] = torch.relu(1 - beta * margin_logits)
        elif part == "quality":
            parts[part] = (-F.logsigmoid(beta * chosen_logratio - reward_mean)
                           - F.logsigmoid(-(beta * rejected_logratio - reward_mean)))
        else:
            parts[part] = -policy_chosen.to(dtype) / len_c  # the sum, whatever ipo did to policy_c
    losses = sum(weights[name] * part for name, part in parts.items())

    rewards_chosen = (beta * chosen_logratio).detach()
    rewards_rejected = (beta * rejected_logratio).detach()
    values = (rewards_chosen, rewards_rejected, rewards_chosen - rewards_rejected,
              (rewards_chosen > rewards_rejected).to(dtype), policy_chosen.detach().to(dtype),
              policy_rejected.detach().to(dtype), reference_chosen.detach().to(dtype),
              reference_rejected.detach().to(dtype))
    metrics = dict(zip(PAIR_METRICS, values))
    metrics.update({f"loss/{name}": part.detach() for name, part in parts.items()})
    return losses, metrics


class RunningRewardMean:
    """BCO-pair's δ: running mean of the per-step batch mean of the implicit rewards ``beta · logratio``.

    TRL's ``RunningMoments`` updates δ with each micro-batch before using it, and averages per-rank
    means, so δ there depends on how a step is split into micro-batches and ranks. Here one update
    per optimizer step uses the mean over the whole global batch (chosen and rejected rewards of
    every pair), and the step's losses use δ from before that update: the numbers are the same for
    any layout. Per step::

        losses, metrics = dpo_loss(..., reward_mean=running.mean)     # each micro-batch
        running.accumulate(metrics["rewards/chosen"], metrics["rewards/rejected"])
        ...
        running.step()                                                # after the optimizer step

    ``all_reduce`` sums a tensor in place across ranks (``dist.all_reduce`` or a partial of it). It
    sees ``[sum of rewards, number of rewards]``, so ranks holding copies of the same pairs (tensor
    parallel) or no pairs (pipeline stages before the last) may take part: the mean is unchanged, and
    every rank that takes part ends the step with the same δ. Reducing over the whole world is the
    simple correct choice. ``device`` is where that tensor lives when this rank had no rewards to
    add (NCCL needs a CUDA tensor).
    """

    def __init__(self, all_reduce: Callable[[torch.Tensor], None] | None = None,
                 device: torch.device | str = "cpu"):
        self.all_reduce, self.device = all_reduce, torch.device(device)
        self.mean = 0.0   # δ for the current step
        self.steps = 0    # updates so far (steps that had any reward, on any rank)
        self._sum: torch.Tensor | None = None
        self._count = 0

    def accumulate(self, rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> None:
        """Adds one micro-batch's rewards ``[P]`` and ``[P]`` to this step's batch; no host sync."""
        total = rewards_chosen.detach().double().sum() + rewards_rejected.detach().double().sum()
        self._sum = total if self._sum is None else self._sum + total
        self._count += rewards_chosen.numel() + rewards_rejected.numel()

    def step(self) -> float:
        """Folds this step's global batch mean into δ; → the new δ. A step with no rewards anywhere
        leaves δ as it was."""
        total = self._sum if self._sum is not None else torch.zeros((), dtype=torch.float64, device=self.device)
        stats = torch.stack([total, torch.tensor(float(self._count), dtype=torch.float64, device=total.device)])
        if self.all_reduce is not None:
            self.all_reduce(stats)
        total, count = stats.tolist()
        self._sum, self._count = None, 0
        if count > 0:
            self.steps += 1
            self.mean += (total / count - self.mean) / self.steps
        return self.mean

    def discard(self) -> None:
        """Forgets this step's rewards (a skipped step); δ stays as it was."""
        self._sum, self._count = None, 0

    def state_dict(self) -> dict:
        return {"mean": self.mean, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted({"mean", "steps"} - set(state))
        if missing:
            raise KeyError(f"RunningRewardMean state is missing {missing}; got keys {sorted(state)}")
        self.mean, self.steps = float(state["mean"]), int(state["steps"])
        self._sum, self._count = None, 0
