"""Freezing, parameter groups, AdamW implementations, the schedule, and global-norm clipping on every layout."""

import json
import math

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from pivot_mega.config import ConfigError, from_dict
from pivot_mega.models import VisionLanguageModel
from pivot_mega.parallel import ParallelConfig, build_mesh, lm_loss, parallelize
from pivot_mega.training import (TOWERS, OptimConfig, apply_trainable, build_optimizer, build_scheduler,
                                 clip_grad_norm_, param_groups, tied_embedding_copies)
from tests.distributed import require_procs, run_workers
from tests.parallel.test_equivalence import ROWS, make_batch, split, tiny_config

MAX_NORM = 0.5   # the tiny model's gradient norm is about 1.3: clipping scales by about 0.4
OPTIM = OptimConfig(lr=1e-2, vision_lr=4e-3, projector_lr=2e-2, weight_decay=0.1, warmup_ratio=0.0)


def expected_lr(name: str, config: OptimConfig) -> float:
    peaks = {"vision": config.vision_lr, "projector": config.projector_lr, "language": config.lr}
    return peaks[name.split(".")[0]] or config.lr


def expected_weight_decay(name: str, config: OptimConfig) -> float:
    # The documented rule: biases and norm weights are not decayed; everything else is, embeddings too.
    return 0.0 if name.endswith(".bias") or "norm" in name else config.weight_decay


def reference_adamw(named_params: dict, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW's per-tensor loop, one group per parameter with the lr and decay the spec gives it."""
    groups = [{"params": [p], "lr": expected_lr(n, config), "weight_decay": expected_weight_decay(n, config)}
              for n, p in named_params.items()]
    return torch.optim.AdamW(groups, betas=config.betas, eps=config.eps, foreach=False, fused=False)


def single_process_backward(model: VisionLanguageModel, seed: int) -> None:
    batch = make_batch(model.config, seed, 0)
    (mb,) = split(batch, slice(0, ROWS), 1)
    hidden = model(mb.input_ids, mb.images, packed=mb.packed, return_hidden=True)
    lm_loss(hidden, model.language.head_weight, mb.targets, int((batch[3] != -100).sum())).backward()


def max_rel_error(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    scale = max(want.abs().max().item(), floor)
    return (got - want).abs().max().item() / scale if scale else (got - want).abs().max().item()


# ----------------------------------------------------------------------------------------------
# freezing


def test_frozen_towers_get_no_state_and_stay_bitwise_unchanged(seed):
    model = VisionLanguageModel(tiny_config()).init_weights(seed)
    apply_trainable(model, ["projector"])
    for name, param in model.named_parameters():
        assert param.requires_grad == name.startswith("projector."), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_ratio=0.0)
    optimizer = build_optimizer(model.named_parameters(), config, "cpu")
    scheduler = build_scheduler(optimizer, config, total_steps=4)
    for _ in range(2):
        single_process_backward(model, seed)
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    with_state = {n for n, p in model.named_parameters() if p in optimizer.state}
    assert with_state == {n for n in before if n.startswith("projector.")}
    for name, param in model.named_parameters():
        if name.startswith("projector."):
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert param.grad is None, name
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    apply_trainable(model, list(TOWERS))
    assert all(p.requires_grad for p in model.parameters())


def test_apply_trainable_names_bad_towers():
    model = VisionLanguageModel(tiny_config())
    with pytest.raises(ValueError, match=r"unknown tower\(s\) \['llm', 'vison'\]"):
        apply_trainable(model, ["vison", "projector", "llm"])
    with pytest.raises(ValueError, match="trainable is empty"):
        apply_trainable(model, [])
    stray = nn.Module()
    stray.language = nn.Linear(2, 2)
    stray.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"parameter 'extra.weight' belongs to none of the towers"):
        apply_trainable(stray, ["language"])


# ----------------------------------------------------------------------------------------------
# parameter groups and the optimizer


def test_param_groups_lr_and_decay_by_name():
    model = VisionLanguageModel(tiny_config())
    apply_trainable(model, ["vision", "projector"])
    config = OptimConfig(lr=1e-4, vision_lr=2e-5, weight_decay=0.05)
    groups = param_groups(model.named_parameters(), config)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in groups:
        for param in group["params"]:
            name = names[id(param)]
            seen.append(name)
            assert group["lr"] == expected_lr(name, config), name
            assert group["weight_decay"] == expected_weight_decay(name, config), name
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert [g["name"] for g in groups] == ["vision", "vision.no_decay", "projector", "projector.no_decay"]
    # Spot checks of the rule on the names it is about.
    group_of = {names[id(p)]: g for g in groups for p in g["params"]}
    assert group_of["vision.layers.0.layer_norm1.weight"]["weight_decay"] == 0.0
    assert group_of["vision.layers.0.self_attn.q_proj.bias"]["weight_decay"] == 0.0
    assert group_of["vision.embeddings.position_embedding.weight"]["weight_decay"] == 0.05
    assert group_of["vision.embeddings.patch_embedding.weight"]["weight_decay"] == 0.05
    assert group_of["projector.linear_1.bias"]["lr"] == 1e-4  # projector_lr None: the base lr
    apply_trainable(model, ["language"])
    group_of = {names[id(p)]: g for g in param_groups(model.named_parameters(), config) for p in g["params"]}
    assert group_of["language.norm.weight"]["weight_decay"] == 0.0
    assert group_of["language.layers.1.post_attention_layernorm.weight"]["weight_decay"] == 0.0
    assert group_of["language.embed_tokens.weight"]["weight_decay"] == 0.05
    assert group_of["language.layers.1.mlp.up_proj.weight"]["lr"] == 1e-4


@pytest.mark.parametrize("device_type", ["cpu", "cuda"], ids=["foreach", "fused"])
def test_adamw_matches_per_tensor_reference(device_type, seed):
    """foreach (CPU) and fused (CUDA; its kernels also run on CPU) give the per-tensor loop's steps."""
    model = VisionLanguageModel(tiny_config()).init_weights(seed)
    reference = VisionLanguageModel(tiny_config()).init_weights(seed)
    optimizer = build_optimizer(model.named_parameters(), OPTIM, device_type)
    assert optimizer.defaults["fused" if device_type == "cuda" else "foreach"] is True
    ref_optimizer = reference_adamw(dict(reference.named_parameters()), OPTIM)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
            grad = torch.randn(param.shape, generator=gen)
            param.grad, ref.grad = grad.clone(), grad.clone()
        optimizer.step()
        ref_optimizer.step()
    worst = max(max_rel_error(p.detach(), r.detach()) for p, r in zip(model.parameters(), reference.parameters()))
    print(f"adamw {device_type}: max rel err vs per-tensor loop {worst:.1e}")
    assert worst <= 1e-6


def test_nothing_to_train_still_steps():
    """A pipeline stage holding only frozen towers gets an empty group and can step like the others."""
    model = VisionLanguageModel(tiny_config())
    apply_trainable(model, ["vision"])
    optimizer = build_optimizer(model.language.named_parameters(prefix="language"), OptimConfig(), "cpu")
    assert [g["name"] for g in optimizer.param_groups] == ["empty"]
    scheduler = build_scheduler(optimizer, OptimConfig(), total_steps=10)
    optimizer.step()
    scheduler.step()
    assert not optimizer.state


def test_optim_config_defaults_and_validation():
    default = OptimConfig()
    # PIVOT's DPO stage (pivot-recipe.md) and the HF Trainer defaults it ran with.
    assert (default.lr, default.weight_decay, default.warmup_ratio, default.min_lr_ratio) == (1e-6, 0.0, 0.03, 0.0)
    assert (default.betas, default.eps, default.max_grad_norm) == ((0.9, 0.999), 1e-8, 1.0)
    loaded = from_dict(OptimConfig, {"lr": 1e-5, "vision_lr": 2e-6, "betas": [0.9, 0.95]}, where="optim").validate()
    assert loaded.betas == (0.9, 0.95) and loaded.vision_lr == 2e-6
    bad = {"lr": ({"lr": 0}, r"optim.lr: must be a number > 0, got 0"),
           "vision_lr": ({"vision_lr": "fast"}, r"optim.vision_lr: must be a number > 0, got 'fast'"),
           "betas": ({"betas": [0.9]}, r"optim.betas: must be two numbers in \[0, 1\)"),
           "warmup": ({"warmup_ratio": 1.5}, r"optim.warmup_ratio: must be in \[0, 1\], got 1.5"),
           "decay": ({"weight_decay": -0.1}, r"optim.weight_decay: must be >= 0")}
    for name, (values, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            from_dict(OptimConfig, values, where="optim").validate()
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\]"):
        from_dict(OptimConfig, {"learning_rate": 1e-5}, where="optim")


# ----------------------------------------------------------------------------------------------
# schedule


def test_schedule_values_per_group():
    model = VisionLanguageModel(tiny_config())
    config = OptimConfig(lr=1e-3, vision_lr=1e-4, projector_lr=2e-3, warmup_ratio=0.05, min_lr_ratio=0.1)
    optimizer = build_optimizer(model.named_parameters(), config, "cpu")
    scheduler = build_scheduler(optimizer, config, total_steps=106)  # warmup ceil(5.3) = 6 steps
    peaks = {"vision": 1e-4, "projector": 2e-3, "language": 1e-3}
    cos = math.cos
    want = {0: 0.0, 3: 0.5, 5: 5 / 6, 6: 1.0,
            31: 0.1 + 0.9 * 0.5 * (1 + cos(math.pi / 4)),        # a quarter into the decay
            56: 0.1 + 0.9 * 0.5,                                  # half way
            81: 0.1 + 0.9 * 0.5 * (1 + cos(3 * math.pi / 4)),
            106: 0.1, 120: 0.1}                                   # the end, and past it
    for step in range(121):
        if step in want:
            for group in optimizer.param_groups:
                peak = peaks[group["name"].split(".")[0]]
                assert group["lr"] == pytest.approx(peak * want[step], rel=1e-12, abs=1e-18), (step, group["name"])
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("warmup_ratio,min_lr_ratio,total", [(0.03, 0.0, 200), (0.1, 0.2, 37), (0.0, 0.05, 50)])
def test_schedule_matches_transformers(warmup_ratio, min_lr_ratio, total):
    """transformers' schedule, as the HF Trainer PIVOT used builds it (warmup = ceil(ratio × steps))."""
    optimizers = [torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0) for _ in range(2)]
    ours = build_scheduler(optimizers[0], OptimConfig(lr=1.0, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio),
                           total)
    theirs = get_cosine_with_min_lr_schedule_with_warmup(
        optimizers[1], num_warmup_steps=math.ceil(total * warmup_ratio), num_training_steps=total,
        min_lr_rate=min_lr_ratio)
    worst = 0.0
    for _ in range(total + 1):
        worst = max(worst, abs(ours.get_last_lr()[0] - theirs.get_last_lr()[0]))
        for optimizer, scheduler in zip(optimizers, (ours, theirs)):
            optimizer.step()
            scheduler.step()
    assert worst <= 1e-12, worst
    # Past the last step transformers' cosine climbs again; ours stays at the floor.
    assert ours.get_last_lr()[0] == pytest.approx(min_lr_ratio, abs=1e-15)


def test_schedule_state_loads_into_another_grouping():
    """The state is the step count: it loads where the layout split the parameters into other groups."""
    model = VisionLanguageModel(tiny_config())
    config = OptimConfig(lr=1e-3, vision_lr=1e-4, warmup_ratio=0.1, min_lr_ratio=0.0)
    optimizer = build_optimizer(model.named_parameters(), config, "cpu")
    scheduler = build_scheduler(optimizer, config, total_steps=50)
    for _ in range(17):
        optimizer.step()
        scheduler.step()
    state = json.loads(json.dumps(scheduler.state_dict()))
    assert state == {"last_epoch": 17, "_step_count": 18}
    # Another run: every group split in two (as a mesh split would), built fresh at step 0.
    halves = []
    for group in param_groups(model.named_parameters(), config):
        params = group.pop("params")
        halves += [{**group, "params": params[::2]}, {**group, "params": params[1::2]}]
    resumed_optimizer = torch.optim.AdamW([h for h in halves if h["params"]], lr=config.lr, foreach=True)
    resumed = build_scheduler(resumed_optimizer, config, total_steps=50)
    resumed.load_state_dict(state)
    for _ in range(5):
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        for group in resumed_optimizer.param_groups:
            assert group["lr"] == pytest.approx(lrs[group["name"]], rel=1e-12, abs=1e-18)
        for opt, sched in ((optimizer, scheduler), (resumed_optimizer, resumed)):
            opt.step()
            sched.step()
    with pytest.raises(KeyError, match=r"missing \['_step_count'\]"):
        resumed.load_state_dict({"last_epoch": 3})


# ----------------------------------------------------------------------------------------------
# clipping, one process


def _random_grads(params, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=gen)


def test_clip_grad_norm_matches_torch(seed):
    model = VisionLanguageModel(tiny_config()).init_weights(seed)
    params = list(model.parameters())
    _random_grads(params, seed)
    holders = [nn.Parameter(torch.zeros_like(p)) for p in params]
    for h, p in zip(holders, params):
        h.grad = p.grad.clone()
    want_norm = torch.nn.utils.clip_grad_norm_(holders, 1.0)
    norm = clip_grad_norm_(params, 1.0)
    err = abs(norm.item() - want_norm.item()) / want_norm.item()
    grad_err = max(max_rel_error(p.grad, h.grad) for p, h in zip(params, holders))
    print(f"clip one process: norm rel err {err:.1e}, clipped grad rel err {grad_err:.1e}")
    assert want_norm.item() > 1.0 and err <= 1e-6 and grad_err <= 1e-6
    # Under the limit: measured, not touched.
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, 1e6)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    assert clip_grad_norm_(params, 0).item() == pytest.approx(norm.item(), rel=1e-6)


def test_clip_tied_copy_scaled_but_not_counted(seed):
    params = [nn.Parameter(torch.zeros(5, 3)) for _ in range(3)]
    _random_grads(params, seed, scale=2.0)
    params[2].grad = params[0].grad.clone()  # a tied copy: the same gradient as params[0]
    want_norm = torch.cat([params[0].grad.flatten(), params[1].grad.flatten()]).norm()
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, 1.0, tied_copies=[params[2]])
    assert norm.item() == pytest.approx(want_norm.item(), rel=1e-6)
    factor = 1.0 / (want_norm.item() + 1e-6)
    for p, b in zip(params, before):
        assert torch.allclose(p.grad, b * factor, rtol=1e-6, atol=0)
    assert torch.equal(params[0].grad, params[2].grad)


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_clip_reports_non_finite_norm_and_leaves_grads(bad, seed):
    params = [nn.Parameter(torch.zeros(4, 4)) for _ in range(3)]
    _random_grads(params, seed)
    params[1].grad[2, 3] = bad
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, 1.0)
    assert (math.isinf(norm.item()) if bad == math.inf else math.isnan(norm.item()))
    assert all(torch.allclose(p.grad, b, rtol=0, atol=0, equal_nan=True) for p, b in zip(params, before))


# ----------------------------------------------------------------------------------------------
# clipping and stepping on parallel layouts


LAYOUTS = {
    # Sequence parallelism leaves Partial gradients on replicated norm weights; vision norms stay plain.
    "tp2-sp": (ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), list(TOWERS)),
    "fsdp2-frozen-vision": (ParallelConfig(data_parallel_sharding="fsdp"), ["projector", "language"]),
    # Tied embeddings: the last stage's copy of the embedding must be scaled but counted once.
    "pp2-tied": (ParallelConfig(pipeline_model_parallel_size=2, microbatches=2), list(TOWERS)),
    # FSDP over TP: 2-D meshes, and FSDP shards TP shards with _StridedShard.
    "tp2-fsdp2": (ParallelConfig(tensor_model_parallel_size=2), list(TOWERS)),
}
LAYOUT_RUNS = {"2-ranks": (2, ["tp2-sp", "fsdp2-frozen-vision", "pp2-tied"]), "4-ranks": (4, ["tp2-fsdp2"])}


# Norms of parts, measured before clipping: small parts (sequence-parallel norm weights, whose gradients
# are Partial) hardly move the whole model's norm, so a mistake there must show in its own part's norm.
SUBSETS = {"vision": "vision.", "projector": "projector.", "language": "language.", "norm weights": "norm"}


def _in_subset(name: str, subset: str) -> bool:
    return name.startswith(SUBSETS[subset]) if SUBSETS[subset].endswith(".") else SUBSETS[subset] in name


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _layouts_worker(rank, world_size, names, seed):
    """The layouts in turn on the same ranks: one forward-backward, clip, then one AdamW step with the
    foreach and with the fused implementation from the same clipped gradients."""
    config = tiny_config()
    results = {}
    for name in names:
        parallel, trainable = LAYOUTS[name]
        dims = build_mesh(parallel, config, device_type="cpu")
        with torch.device("meta"):
            model = VisionLanguageModel(config)
        pmodel = parallelize(model, dims, seed=seed, device="cpu")
        apply_trainable(pmodel, trainable)
        batch = make_batch(config, seed, 0)
        total, dp = int((batch[3] != -100).sum()), dims.layout.dp
        rows = ROWS // dp
        micro = split(batch, slice(dims.dp_rank * rows, (dims.dp_rank + 1) * rows), parallel.microbatches)
        pmodel.forward_backward(micro, lambda h, w, mb: lm_loss(h, w, mb.targets, total, dp))
        pp_group = dims.pp_group if dims.layout.pp > 1 else None
        tied = tied_embedding_copies(pmodel)
        subset_norms = {subset: clip_grad_norm_([p for n, p in pmodel.named_parameters() if _in_subset(n, subset)],
                                                None, tied_copies=tied, pp_group=pp_group).item()
                        for subset in SUBSETS}
        norm = clip_grad_norm_(pmodel.parameters(), MAX_NORM, tied_copies=tied, pp_group=pp_group)
        grads = {n: _full(p.grad) for n, p in pmodel.named_parameters() if p.grad is not None}
        start = {n: _local(p).detach().clone() for n, p in pmodel.named_parameters()}
        stepped, with_state = {}, {}
        for device_type in ("cpu", "cuda"):
            with torch.no_grad():
                for n, p in pmodel.named_parameters():
                    _local(p).copy_(start[n])
            optimizer = build_optimizer(pmodel.named_parameters(), OPTIM, device_type)
            optimizer.step()
            stepped[device_type] = {n: _full(p) for n, p in pmodel.named_parameters()}
            with_state[device_type] = sorted(n for n, p in pmodel.named_parameters() if p in optimizer.state)
        results[name] = {"norm": norm.item(), "subset_norms": subset_norms, "grads": grads, "stepped": stepped,
                         "with_state": with_state}
    return results


def _reference(config, trainable: list[str], seed: int):
    model = VisionLanguageModel(config).init_weights(seed)
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".")[0] in trainable)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    single_process_backward(model, seed)
    subset_norms = {}
    for subset in SUBSETS:
        part = [p.grad.flatten() for n, p in model.named_parameters() if _in_subset(n, subset) and p.grad is not None]
        subset_norms[subset] = torch.cat(part).norm().item() if part else 0.0
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], MAX_NORM)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return initial, norm.item(), subset_norms, grads


@pytest.mark.multiproc
@require_procs(2)
@pytest.mark.parametrize("run", LAYOUT_RUNS)
def test_clip_and_step_on_parallel_layouts(run, seed):
    """TP=2 (+SP), FSDP=2 (vision frozen), PP=2 (tied embeddings), TP=2 x FSDP=2 on 4 ranks.

    The norm, of the whole model and of each part, is the single-process norm (<= 1e-5 rel); the
    clipped gradients are its clipped gradients (<= 1e-5 of each tensor's largest); AdamW (foreach
    and fused) steps every shard as a per-tensor loop steps the whole tensor given the same gradients
    (<= 1e-6); frozen parameters keep their values bitwise and get no optimizer state."""
    config = tiny_config()
    world_size, names = LAYOUT_RUNS[run]
    results = run_workers(_layouts_worker, world_size, names, seed)
    report = []
    for name in names:
        trainable = LAYOUTS[name][1]
        initial, ref_norm, ref_subset_norms, ref_grads = _reference(config, trainable, seed)
        assert ref_norm > MAX_NORM
        floor = 1e-4 * max(g.abs().max().item() for g in ref_grads.values())
        per_rank = [r[name] for r in results]
        norm_err = max(abs(r["norm"] - ref_norm) / ref_norm for r in per_rank)
        for subset, want in ref_subset_norms.items():
            for r in per_rank:
                got = r["subset_norms"][subset]
                assert (got == 0.0 if want == 0.0 else abs(got - want) / want <= 1e-5), (name, subset, got, want)
                norm_err = max(norm_err, abs(got - want) / want if want else 0.0)
        grads = {}
        for r in per_rank:  # pipeline stages hold different parameters; TP / FSDP ranks hold all
            grads.update(r["grads"])
        assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
        grad_err = max(max_rel_error(r["grads"][n], ref_grads[n], floor) for r in per_rank for n in r["grads"])

        # The step: a per-tensor AdamW from the initial values with the layout's clipped gradients.
        trained = {n: nn.Parameter(initial[n].clone()) for n in ref_grads}
        for n, p in trained.items():
            p.grad = grads[n]
        reference_adamw(trained, OPTIM).step()
        step_err = 0.0
        for r in per_rank:
            for device_type, params in r["stepped"].items():
                assert r["with_state"][device_type] == sorted(n for n in r["grads"]), (name, device_type)
                for n, value in params.items():
                    if n in trained:
                        step_err = max(step_err, max_rel_error(value, trained[n].detach()))
                    else:
                        assert torch.equal(value, initial[n]), f"{name}: frozen {n} changed"
        report.append(f"{name}: norm rel err {norm_err:.1e}, clipped grad rel err {grad_err:.1e}, "
                      f"step rel err {step_err:.1e}")
        assert norm_err <= 1e-5, report[-1]
        assert grad_err <= 1e-5, report[-1]
        assert step_err <= 1e-6, report[-1]
    print("\n".join(report))
