"""Losses vs plain per-pair references in float64 (the published formulas, gradients derived by hand).

References: DPO (Rafailov et al. 2023, eq. 7) with conservative label smoothing as TRL applies it;
IPO (Azar et al. 2023, eq. 17) on per-token averaged log-probs (TRL); hinge (SLiC, TRL); BCO-pair
(TRL); MPO (Wang et al. 2024: preference + quality + generation, InternVL's weights).
"""

import math

import pytest
import torch
import torch.distributed as dist

from pivot_mega.config import ConfigError, from_dict
from pivot_mega.parallel import global_scale
from pivot_mega.training import DPOConfig, RunningRewardMean, dpo_loss, sequence_logprob_sums
from tests.distributed import require_procs, run_workers

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}  # max abs error / max |reference|


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def reference_pair(cfg: DPOConfig, pc, pr, rc, rr, lc, lr, delta):
    """One pair: → (loss, dloss/d policy_chosen, dloss/d policy_rejected), from the formulas."""
    beta = cfg.beta
    loss = d_pc = d_pr = 0.0

    def add(weight, value, grad_c, grad_r):
        nonlocal loss, d_pc, d_pr
        loss, d_pc, d_pr = loss + weight * value, d_pc + weight * grad_c, d_pr + weight * grad_r

    h = (pc - rc) - (pr - rr)  # log [pi(c) / ref(c)] - log [pi(r) / ref(r)]
    if cfg.loss_type in ("sigmoid", "mpo"):
        eps = cfg.label_smoothing
        value = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        dh = -(1 - eps) * beta * sigmoid(-beta * h) + eps * beta * sigmoid(beta * h)
        add(cfg.mpo_preference_weight if cfg.loss_type == "mpo" else 1.0, value, dh, -dh)
    if cfg.loss_type == "ipo":
        h_avg = (pc / lc - rc / lc) - (pr / lr - rr / lr)
        slack = h_avg - 1 / (2 * beta)
        add(1.0, slack ** 2, 2 * slack / lc, -2 * slack / lr)
    if cfg.loss_type == "hinge":
        active = 1 - beta * h > 0
        add(1.0, max(0.0, 1 - beta * h), -beta if active else 0.0, beta if active else 0.0)
    if cfg.loss_type in ("bco_pair", "mpo"):
        x_c, x_r = beta * (pc - rc) - delta, beta * (pr - rr) - delta
        value = -log_sigmoid(x_c) - log_sigmoid(-x_r)
        weight = cfg.mpo_quality_weight if cfg.loss_type == "mpo" else 1.0
        add(weight, value, -beta * sigmoid(-x_c), beta * sigmoid(x_r))
    sft = cfg.mpo_generation_weight if cfg.loss_type == "mpo" else cfg.sft_weight
    if sft:
        add(sft, -pc / lc, -1 / lc, 0.0)
    return loss, d_pc, d_pr


def random_pairs(num_pairs: int, gen: torch.Generator):
    """Log-prob sums of responses of 1-200 tokens; policy and reference apart by a few nats."""
    len_c = torch.randint(1, 201, (num_pairs,), generator=gen)
    len_r = torch.randint(1, 201, (num_pairs,), generator=gen)
    policy_c = -len_c * (0.2 + 2 * torch.rand(num_pairs, generator=gen, dtype=torch.float64))
    policy_r = -len_r * (0.2 + 2 * torch.rand(num_pairs, generator=gen, dtype=torch.float64))
    ref_c = policy_c + 5 * torch.randn(num_pairs, generator=gen, dtype=torch.float64)
    ref_r = policy_r + 5 * torch.randn(num_pairs, generator=gen, dtype=torch.float64)
    return policy_c, policy_r, ref_c, ref_r, len_c, len_r


CASES = {
    "sigmoid": DPOConfig(),
    "sigmoid-smoothed": DPOConfig(label_smoothing=0.15),
    "sigmoid-sft": DPOConfig(sft_weight=0.5, beta=0.3),
    "ipo": DPOConfig(loss_type="ipo", beta=0.5),
    "ipo-sft": DPOConfig(loss_type="ipo", beta=0.05, sft_weight=0.2),
    "hinge": DPOConfig(loss_type="hinge", beta=0.2),
    "bco_pair": DPOConfig(loss_type="bco_pair"),
    "mpo": DPOConfig(loss_type="mpo"),
    "mpo-smoothed-weights": DPOConfig(loss_type="mpo", label_smoothing=0.1, mpo_preference_weight=0.6,
                                      mpo_quality_weight=0.5, mpo_generation_weight=0.3, beta=0.2),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES)
def test_pair_loss_and_grads_match_reference(case, dtype, seed):
    cfg = CASES[case].validate()
    gen = torch.Generator().manual_seed(seed)
    pairs = [t.to(dtype) if t.is_floating_point() else t for t in random_pairs(24, gen)]
    delta = float(torch.randn((), generator=gen, dtype=torch.float64)) if cfg.loss_type in ("bco_pair", "mpo") else 0.0
    policy_c, policy_r, ref_c, ref_r = (t.clone().requires_grad_() for t in pairs[:4])
    losses, metrics = dpo_loss(policy_c, policy_r, ref_c, ref_r, pairs[4], pairs[5], cfg, reward_mean=delta)
    losses.mean().backward()

    rows = [reference_pair(cfg, *(float(t[i]) for t in pairs), delta) for i in range(24)]
    want_loss = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    want_grad_c = torch.tensor([r[1] for r in rows], dtype=torch.float64) / 24
    want_grad_r = torch.tensor([r[2] for r in rows], dtype=torch.float64) / 24

    def rel(got, want):
        return ((got.double() - want).abs().max() / want.abs().max()).item()

    errors = {"loss": rel(losses, want_loss), "grad_chosen": rel(policy_c.grad, want_grad_c),
              "grad_rejected": rel(policy_r.grad, want_grad_r)}
    print(f"{case} {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert losses.dtype == dtype and losses.shape == (24,)
    assert max(errors.values()) <= TOL[dtype], errors
    # The reference model is a constant: no gradient reaches its log-probs.
    assert ref_c.grad is None and ref_r.grad is None
    assert all(not m.requires_grad for m in metrics.values())


def test_label_smoothing_is_the_loss_under_flipped_labels(seed):
    """cDPO: (1 - ε) · L(chosen ≻ rejected) + ε · L(rejected ≻ chosen); ε = 0 is plain DPO."""
    gen = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr, lc, lr = random_pairs(16, gen)
    plain, _ = dpo_loss(pc, pr, rc, rr, lc, lr, DPOConfig())
    flipped, _ = dpo_loss(pr, pc, rr, rc, lr, lc, DPOConfig())
    smoothed, _ = dpo_loss(pc, pr, rc, rr, lc, lr, DPOConfig(label_smoothing=0.2))
    want_plain = torch.tensor([-log_sigmoid(0.1 * float((pc[i] - rc[i]) - (pr[i] - rr[i]))) for i in range(16)],
                              dtype=torch.float64)
    assert torch.allclose(plain, want_plain, rtol=1e-12, atol=0)
    assert torch.allclose(smoothed, 0.8 * plain + 0.2 * flipped, rtol=1e-12, atol=0)
    assert (smoothed - plain).abs().max() > 1e-3


def test_reward_metrics():
    # Pair 0: chosen gains on the reference, pair 1: rejected does, pair 2: a tie (not counted as right).
    pc = torch.tensor([-10.0, -20.0, -30.0], dtype=torch.float64)
    pr = torch.tensor([-12.0, -15.0, -31.0], dtype=torch.float64)
    rc = torch.tensor([-11.0, -19.0, -29.0], dtype=torch.float64)
    rr = torch.tensor([-11.0, -16.0, -30.0], dtype=torch.float64)
    lc, lr = torch.tensor([4, 5, 10]), torch.tensor([2, 5, 10])
    _, m = dpo_loss(pc, pr, rc, rr, lc, lr, DPOConfig(beta=0.5))
    assert m["rewards/chosen"].tolist() == [0.5, -0.5, -0.5]
    assert m["rewards/rejected"].tolist() == [-0.5, 0.5, -0.5]
    assert m["rewards/margins"].tolist() == [1.0, -1.0, 0.0]
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0, 0.0]
    assert m["logps/chosen"].tolist() == pc.tolist() and m["logps/rejected"].tolist() == pr.tolist()
    assert m["ref_logps/chosen"].tolist() == rc.tolist() and m["ref_logps/rejected"].tolist() == rr.tolist()
    assert set(k for k in m if k.startswith("loss/")) == {"loss/preference"}
    # IPO's rewards are on the per-token averages its loss uses.
    _, m = dpo_loss(pc, pr, rc, rr, lc, lr, DPOConfig(loss_type="ipo", beta=0.5))
    assert m["rewards/chosen"].tolist() == pytest.approx([0.5 * (1 / 4), 0.5 * (-1 / 5), 0.5 * (-1 / 10)], rel=1e-12)
    assert m["rewards/rejected"].tolist() == pytest.approx([0.5 * (-1 / 2), 0.5 * (1 / 5), 0.5 * (-1 / 10)],
                                                           rel=1e-12)
    # MPO reports its three parts, unweighted.
    losses, m = dpo_loss(pc, pr, rc, rr, lc, lr, DPOConfig(loss_type="mpo"), reward_mean=0.1)
    assert set(k for k in m if k.startswith("loss/")) == {"loss/preference", "loss/quality", "loss/sft"}
    assert torch.allclose(m["loss/sft"], -pc / lc)
    assert torch.allclose(losses, 0.8 * m["loss/preference"] + 0.2 * m["loss/quality"] + m["loss/sft"])


def test_low_precision_inputs_are_computed_in_fp32(seed):
    gen = torch.Generator().manual_seed(seed)
    pairs = random_pairs(8, gen)
    bf16 = [t.to(torch.bfloat16) for t in pairs[:4]]
    losses, metrics = dpo_loss(*bf16, pairs[4], pairs[5], DPOConfig())
    want, _ = dpo_loss(*[t.double() for t in bf16], pairs[4], pairs[5], DPOConfig())
    assert losses.dtype == torch.float32 and metrics["rewards/chosen"].dtype == torch.float32
    assert torch.allclose(losses.double(), want, rtol=1e-5, atol=1e-6)


def test_dpo_loss_rejects_mismatched_shapes():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match=r"rejected_tokens': \(3,\)"):
        dpo_loss(x, x, x, x, torch.ones(4), torch.ones(3), DPOConfig())


def test_sequence_logprob_sums_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    num_sequences, num_tokens = 13, 300
    index = torch.randint(0, num_sequences - 2, (num_tokens,), generator=gen)  # the last two stay empty
    token_lp = (-5 * torch.rand(num_tokens, generator=gen, dtype=torch.float64)).requires_grad_()
    sums, counts = sequence_logprob_sums(token_lp, index, num_sequences)
    want_sums, want_counts = [0.0] * num_sequences, [0] * num_sequences
    for lp, s in zip(token_lp.tolist(), index.tolist()):
        want_sums[s] += lp
        want_counts[s] += 1
    err = (sums - torch.tensor(want_sums, dtype=torch.float64)).abs().max().item()
    print(f"sequence_logprob_sums: max abs err {err:.1e}")
    assert err <= 1e-12
    assert counts.tolist() == want_counts and counts.dtype == torch.int64
    weights = torch.randn(num_sequences, generator=gen, dtype=torch.float64)
    (sums * weights).sum().backward()
    assert torch.equal(token_lp.grad, weights[index])


def test_sequence_logprob_sums_names_bad_inputs():
    lp = torch.zeros(5)
    with pytest.raises(ValueError, match=r"sequence_index holds values in \[0, 4\], outside \[0, 4\)"):
        sequence_logprob_sums(lp, torch.tensor([0, 1, 2, 3, 4]), 4)
    with pytest.raises(ValueError, match=r"sequence_index \(4,\)"):
        sequence_logprob_sums(lp, torch.zeros(4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="integers"):
        sequence_logprob_sums(lp, torch.zeros(5), 4)


def test_global_scale_gives_the_mean_nll_over_the_global_batch(seed):
    gen = torch.Generator().manual_seed(seed)
    token_lp = -3 * torch.rand(40, generator=gen, dtype=torch.float64)
    # One rank's 40 tokens of a global batch of 100 tokens over 4 data-parallel ranks.
    got = -token_lp.sum() * global_scale(100, dp_size=4)
    want = sum(-x for x in token_lp.tolist()) / 100 * 4
    assert abs(got.item() - want) <= 1e-12 * abs(want)
    assert (torch.ones(3).sum() * global_scale(6)).item() == 0.5
    with pytest.raises(ValueError, match="global_count must be > 0, got 0"):
        global_scale(0)


# ----------------------------------------------------------------------------------------------
# BCO-pair's running reward mean


def test_running_reward_mean_per_step_and_split_independent(seed):
    gen = torch.Generator().manual_seed(seed)
    steps = [(torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64))
             for n in (6, 3, 9, 4)]
    whole, split = RunningRewardMean(), RunningRewardMean()
    step_means, deltas = [], []
    for chosen, rejected in steps:
        deltas.append(whole.mean)
        whole.accumulate(chosen, rejected)
        for part in range(3):  # the same step as three micro-batches of unequal size
            take = slice(part * len(chosen) // 3, (part + 1) * len(chosen) // 3)
            split.accumulate(chosen[take], rejected[take])
        step_means.append((chosen.sum() + rejected.sum()).item() / (2 * len(chosen)))
        assert whole.step() == pytest.approx(split.step(), rel=1e-12, abs=1e-15)
    # δ of step k is the mean of the batch means of the steps before it.
    for k, delta in enumerate(deltas):
        want = sum(step_means[:k]) / k if k else 0.0
        assert abs(delta - want) <= 1e-12, (k, delta, want)
    assert abs(whole.mean - sum(step_means) / 4) <= 1e-12
    # A step without pairs anywhere changes nothing.
    before = whole.state_dict()
    whole.step()
    assert whole.state_dict() == before


def test_running_reward_mean_state_round_trip(seed):
    gen = torch.Generator().manual_seed(seed)
    first = RunningRewardMean()
    for _ in range(3):
        first.accumulate(torch.randn(4, generator=gen), torch.randn(4, generator=gen))
        first.step()
    resumed = RunningRewardMean()
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == first.state_dict()
    for _ in range(2):
        chosen, rejected = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
        for running in (first, resumed):
            running.accumulate(chosen, rejected)
            running.step()
    assert resumed.mean == first.mean and resumed.steps == first.steps == 5
    with pytest.raises(KeyError, match=r"missing \['steps'\]"):
        RunningRewardMean().load_state_dict({"mean": 0.0})


def _running_mean_worker(rank, world_size, per_rank_steps):
    running = RunningRewardMean(all_reduce=dist.all_reduce)
    means = []
    for per_rank in per_rank_steps:
        chosen, rejected = per_rank[rank]
        if len(chosen):
            running.accumulate(chosen, rejected)
        means.append(running.step())
    return means


@pytest.mark.multiproc
@require_procs(2)
def test_running_reward_mean_is_global_across_ranks(seed):
    """Two ranks holding unequal shares of each step's pairs (one step none on rank 1, as a pipeline
    stage before the last would) end every step with the single-process δ."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for counts in ((3, 5), (4, 0), (1, 2)):
        steps.append([(torch.randn(n, generator=gen, dtype=torch.float64),
                       torch.randn(n, generator=gen, dtype=torch.float64)) for n in counts])
    single = RunningRewardMean()
    want = []
    for per_rank in steps:
        for chosen, rejected in per_rank:
            single.accumulate(chosen, rejected)
        want.append(single.step())
    results = run_workers(_running_mean_worker, 2, steps)
    for rank, means in enumerate(results):
        err = max(abs(a - b) for a, b in zip(means, want))
        print(f"running mean rank {rank}: max abs err {err:.1e}")
        assert err <= 1e-12


# ----------------------------------------------------------------------------------------------
# config


def test_dpo_config_from_dict_and_validation():
    cfg = from_dict(DPOConfig, {"loss_type": "mpo", "beta": 0.2, "mpo_quality_weight": 0.3}, where="dpo")
    assert cfg == DPOConfig(loss_type="mpo", beta=0.2, mpo_quality_weight=0.3)
    assert DPOConfig().loss_type == "sigmoid" and DPOConfig().beta == 0.1 and DPOConfig().label_smoothing == 0.0
    with pytest.raises(ConfigError, match=r"dpo.loss_type: 'kto' is not one of"):
        from_dict(DPOConfig, {"loss_type": "kto"}, where="dpo")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bta'\]"):
        from_dict(DPOConfig, {"bta": 0.1}, where="dpo")
    bad = {"beta": ({"beta": 0.0}, "dpo.beta: must be > 0"),
           "smoothing-range": ({"label_smoothing": 0.5}, r"dpo.label_smoothing: must be in \[0, 0.5\)"),
           "smoothing-hinge": ({"loss_type": "hinge", "label_smoothing": 0.1}, "loss_type 'hinge'"),
           "sft-mpo": ({"loss_type": "mpo", "sft_weight": 1.0}, "dpo.mpo_generation_weight"),
           "mpo-weight": ({"mpo_quality_weight": -0.1}, "dpo.mpo_quality_weight: must be >= 0")}
    for name, (values, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            from_dict(DPOConfig, values, where="dpo").validate()
