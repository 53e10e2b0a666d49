"""``pivot-mega bench``: training-step throughput on synthetic batches of a model's real shapes.

The batch: ``micro_batches`` micro-batches of ``rows`` packed rows of ``seq_len`` tokens. For DPO each
row holds preference pairs: two sequences (image tokens, a prompt, a response) that show the same
image; for the other stages each row holds sequences of the same make-up. Tokens and pixels are
random (seeded); the step is the trainer's own (``StepRunner``) plus the optimizer step.

``--compare-naive`` also times the DPO step as simple implementations write it, on the same model,
optimizer and batch, in the same process: full ``[B, S, V]`` logits and ``log_softmax`` for every
position, its own label shift, each sequence encoding its own copy of the image, and the reference
model's forward every step. Before anything is timed both steps' DPO losses and per-sequence policy
log-probs must agree (:data:`CHECK_TOLERANCE`), on a reference that differs from the policy (its weights
perturbed: with equal models every DPO loss is ln 2 whatever the log-probs are), or the bench fails.
Each path's peak memory is measured on its own: in a fresh process per path on CPU (the high-water mark
of a process cannot be reset), after ``reset_peak_memory_stats`` on CUDA.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import ModelConfig, load_model_config
from ..data.packing import build_micro_batch
from ..batch import IGNORE_INDEX
from ..data.templates import Sequence, Unit, pair_unit
from ..models.mllm import VisionLanguageModel
from ..parallel import ParallelConfig, build_mesh, parallelize
from ..precision import PrecisionConfig, apply_precision, check_precision
from ..presets import MODEL_PRESETS, model_preset_path
from ..profiling import peak_tflops
from .losses import DPOConfig, dpo_loss
from .optim import OptimConfig, apply_trainable, build_optimizer
from .optim import PIVOT_STAGE_DEFAULTS
from .reference import OnlineReference, PrecomputedReference
from .plan import RankCoords, state_bytes
from .reference import sequence_sums
from .steps import StepRunner, data_flops

# Relative bounds within which the optimised and the naive step must agree (loss, and the per-sequence
# policy log-prob sums): fp32 on CPU; bf16 autocast on CUDA, where the two paths round differently
# (the naive one keeps bf16 [B, S, V] logits, the optimised head accumulates in fp32).
CHECK_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
# The check is void unless the loss is this far from ln 2 (what any log-probs give when policy = reference).
MIN_DISTANCE_FROM_LN2 = 1e-3
# Relative size of the seeded noise added to the reference's weights (a copy of the policy's) for the check.
REFERENCE_NOISE = 0.5


class BenchError(ValueError):
    """Options the bench cannot run with (found before any model is built): one line at the CLI."""


class BenchCheckFailed(RuntimeError):
    """The optimised and naive steps (or the two layouts) disagree: the timings would compare unlike things."""


@dataclasses.dataclass
class BenchOptions:
    stage: str = "dpo"
    preset: str = "tiny"
    steps: int = 5
    warmup: int = 2
    seq_len: int = 0
    rows: int = 1
    micro_batches: int = 2
    response_len: int = 0
    reference: str = "precomputed"
    dpo_layout: str = "shared_prefix"  # shared_prefix | separate (data.dpo_layout)
    compare_naive: bool = False
    compare_layouts: bool = False
    dtype: str | None = None
    attention: str | None = None
    activation_checkpointing: bool = False
    fp8: str = "none"  # none | torchao (precision.fp8 of the training run)
    seed: int = 0
    overrides: list = dataclasses.field(default_factory=list)
    only: str | None = None  # internal: build just what this path needs and measure its memory (CPU child)


def model_config_for(preset: str, overrides: list[str] = ()) -> ModelConfig:
    path = model_preset_path(preset) if preset in MODEL_PRESETS else Path(preset)
    if not path.is_file():
        raise FileNotFoundError(f"bench preset {preset!r}: neither one of {sorted(MODEL_PRESETS)} "
                                f"nor a model config file")
    return load_model_config(path, list(overrides))


def row_shapes(config: ModelConfig, options: BenchOptions) -> tuple[int, int, int]:
    """(row length, text tokens per sequence, response tokens) of ``options`` on ``config``: checked from
    the config alone, so a row too short for the image tokens is refused before any model is built."""
    tokens = config.num_image_tokens
    seq_len = options.seq_len or 4 * tokens
    per_row = 2  # sequences per row: a pair, or two samples
    text = seq_len // per_row - tokens
    if text < 4:
        raise BenchError(f"--seq-len {seq_len}: rows must hold {per_row} sequences of {tokens} image tokens "
                         f"plus text; give at least {per_row * (tokens + 4)}")
    response = options.response_len or max(1, text // 4)
    if response >= text:
        raise BenchError(f"--response-len {response} leaves no prompt in {text} text tokens per sequence")
    return seq_len, text, response


def synthetic_batches(config: ModelConfig, options: BenchOptions, generator: np.random.Generator,
                      shared_prefix: bool | None = None, *, return_labels: bool = False):
    """The step's MicroBatches (images decoded already: random SigLIP-range pixels).

    Rows of ``--seq-len`` tokens in the separate layout: one pair (two sequences of half a row), or two
    samples. ``shared_prefix`` (default: ``--dpo-layout``) lays the same pairs out as ``prefix | chosen |
    rejected``, in rows as long as that needs; the same generator state gives the same tokens and
    pixels either way. ``return_labels``: also → each micro-batch's int64 ``[R, S]`` labels (label t is
    token t; IGNORE_INDEX: untrained), for a step that shifts them itself.
    """
    shared_prefix = options.dpo_layout == "shared_prefix" if shared_prefix is None else shared_prefix
    seq_len, text, response = row_shapes(config, options)
    tokens = config.num_image_tokens
    pair = options.stage == "dpo"
    per_row = 2
    vocab = config.language.vocab_size
    low = 0 if config.image_token_id != 0 else 1

    def ids(n):
        out = generator.integers(low, vocab - 1, n)
        out[out == config.image_token_id] = (config.image_token_id + 1) % vocab
        return [int(x) for x in out]

    def prompt_of(prompt_ids):
        return [ids(1)[0]] + [config.image_token_id] * tokens + prompt_ids

    def untrained(n):
        return [IGNORE_INDEX] * n

    prompt_len = 1 + tokens + (text - response - 1)
    row_len = prompt_len + 2 * response if pair and shared_prefix else seq_len
    size = config.vision.image_size
    batches, labels, index = [], [], 0
    for _ in range(options.micro_batches):
        rows = []
        for _ in range(options.rows):
            units = []
            if pair:
                prompt, chosen, rejected = prompt_of(ids(text - response - 1)), ids(response), ids(response)
                units.append(pair_unit(index, f"pair-{index}", (prompt, untrained(len(prompt)), 1), (chosen, chosen),
                                       (rejected, rejected), ["jpg"], shared_prefix=shared_prefix))
                index += 1
            else:
                for _ in range(per_row):
                    prompt, answer = prompt_of(ids(text - response - 1)), ids(response)
                    units.append(Unit(index, f"sample-{index}", [Sequence(np.array(prompt + answer, dtype=np.int64),
                                      np.array(untrained(len(prompt)) + answer, dtype=np.int64), 1)], ["jpg"]))
                    index += 1
            rows.append(units)
        batch = build_micro_batch(rows, row_len, pad_token_id=0)
        row_labels = np.full((len(rows), row_len), IGNORE_INDEX, dtype=np.int64)
        for r, units in enumerate(rows):  # sequences lie in a row one after another, padding last
            row = np.concatenate([seq.labels for unit in units for seq in unit.sequences])
            row_labels[r, :len(row)] = row
        labels.append(torch.from_numpy(row_labels))
        distinct = list(dict.fromkeys(batch.image_refs))
        where = {ref: k for k, ref in enumerate(distinct)}
        batch.images = torch.from_numpy(generator.uniform(-1, 1, (len(distinct), 3, size, size)).astype(np.float32))
        if len(distinct) != len(batch.image_refs):
            batch.image_index = torch.tensor([where[ref] for ref in batch.image_refs], dtype=torch.int64)
        batch.global_samples, batch.global_tokens = batch.num_samples, batch.num_tokens
        batch.global_label_tokens = batch.num_label_tokens
        batches.append(batch)
    return (batches, labels) if return_labels else batches


def naive_dpo_step(policy: VisionLanguageModel, reference: VisionLanguageModel, batches: list, labels: list,
                   config: DPOConfig, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """The DPO step written plainly: full logits, log_softmax everywhere, labels shifted here, each
    sequence encodes its image, the reference model runs its forward. ``labels``: each batch's ``[R, S]``
    labels (``synthetic_batches(return_labels=True)``). Gradients accumulate in ``policy``;
    → (the mean loss, fp32 ``[P, 2]`` policy log-prob sums of each pair's chosen and rejected response)."""
    num_pairs = sum(b.num_pairs for b in batches)
    total, pair_sums = torch.zeros(()), []
    device = next(policy.parameters()).device
    for batch, batch_labels in zip(batches, labels):
        packed = batch.packed.to(device)
        # Position t predicts label t + 1 when both lie in one segment (IGNORE_INDEX: nothing).
        segments = packed.segment_ids.reshape(batch_labels.shape)
        batch_labels = batch_labels.to(device)
        targets = torch.full_like(batch_labels, IGNORE_INDEX)
        targets[:, :-1] = torch.where(segments[:, 1:] == segments[:, :-1], batch_labels[:, 1:], IGNORE_INDEX)
        segments = segments.reshape(-1)

        def sums(model):
            logits = model(batch.input_ids.to(device), batch.pixel_values.to(device), packed=packed).float()
            logprobs = F.log_softmax(logits, dim=-1)
            mask = targets != IGNORE_INDEX
            token = torch.gather(logprobs, -1, targets.clamp(min=0)[..., None])[..., 0] * mask
            per_segment = torch.zeros(packed.num_segments, device=device).index_add(0, segments, token.reshape(-1))
            counts = torch.zeros(packed.num_segments, device=device).index_add(0, segments, mask.reshape(-1).float())
            return per_segment, counts
        with autocast():
            with torch.no_grad():
                ref, _ = sums(reference)
            policy_sums, counts = sums(policy)
        chosen, rejected = batch.pair_segments[:, 0].to(device), batch.pair_segments[:, 1].to(device)
        losses, _ = dpo_loss(policy_sums[chosen], policy_sums[rejected], ref[chosen], ref[rejected], counts[chosen],
                             counts[rejected], config)
        loss = losses.sum() / num_pairs
        loss.backward()
        total += loss.detach().cpu()
        pair_sums.append(torch.stack([policy_sums[chosen], policy_sums[rejected]], 1).detach().float().cpu())
    return total, torch.cat(pair_sums)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _process_peak_memory_gb(device: torch.device) -> float:
    """This process's high-water mark so far: CUDA allocations, or the host's resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def available_memory_bytes(device_type: str) -> tuple[int, str]:
    """Memory a new training state can take here, and where the figure comes from."""
    if device_type == "cuda":
        return torch.cuda.mem_get_info()[0], f"free on {torch.cuda.get_device_name()}"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    raise BenchError("cannot tell the available memory: no MemAvailable in /proc/meminfo")


def check_memory(config: ModelConfig, options: BenchOptions, parallel: ParallelConfig, layout, trainable,
                 device_type: str, with_reference: bool) -> int:
    """Refuses, before anything is built, a model whose training state cannot fit (``plan.state_bytes``:
    fp32 parameters, gradients and AdamW moments of this rank; plus the frozen reference model's
    parameters when one is built). Activations are not counted: the figure is a lower bound. → bytes."""
    params, grads, optimizer = state_bytes(config, parallel, layout, RankCoords(), list(trainable))
    needed = params + grads + optimizer + (params if with_reference else 0)
    available, source = available_memory_bytes(device_type)
    if needed > available:
        what = "parameters, gradients and AdamW moments" + (" and the reference model" if with_reference else "")
        raise BenchError(f"--preset {options.preset}: its training state ({what}, activations not counted) needs "
                         f"{needed / 2**30:.1f} GiB and {available / 2**30:.1f} GiB is available ({source}); "
                         f"pick a smaller preset or more devices")
    return needed


def _perturb(model, seed: int, scale: float) -> None:
    """Adds seeded noise of ``scale`` times each parameter's std (a reference unlike the policy)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.numel() > 1:
                local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                noise = torch.randn(local.shape, generator=generator, dtype=torch.float32)
                local.add_(noise.to(local.device, local.dtype) * (scale * float(local.float().std())))


def run_benchmark(options: BenchOptions) -> dict:
    if options.stage not in PIVOT_STAGE_DEFAULTS:
        raise BenchError(f"--stage {options.stage!r}: one of {sorted(PIVOT_STAGE_DEFAULTS)}")
    if options.compare_naive and options.stage != "dpo":
        raise BenchError("--compare-naive times the naive DPO step: use --stage dpo")
    if options.compare_layouts and options.stage != "dpo":
        raise BenchError("--compare-layouts times the two DPO pair layouts: use --stage dpo")
    config = model_config_for(options.preset, options.overrides)
    if options.attention:
        config.attention = options.attention
    config.activation_checkpointing = options.activation_checkpointing
    row_shapes(config, options)  # every shape check before any model is built
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = options.dtype or ("bf16" if device_type == "cuda" else "fp32")
    if dtype == "bf16" and device_type != "cuda":
        raise BenchError("--dtype bf16 needs a CUDA device (CPU runs fp32)")
    precision = PrecisionConfig(fp8=options.fp8)
    check_precision(precision, device_type)
    parallel = ParallelConfig(mixed_precision="bf16" if dtype == "bf16" and dist.is_initialized()
                              and dist.get_world_size() > 1 else "fp32")
    dims = build_mesh(parallel, config, device_type)
    if options.compare_naive and dims.layout.world_size != 1:
        raise BenchError("--compare-naive runs in one process (the naive step has no parallelism)")
    trainable = tuple(PIVOT_STAGE_DEFAULTS[options.stage]["trainable"])
    needs_model = options.stage == "dpo" and (options.reference == "online" or options.compare_naive)
    check_memory(config, options, parallel, dims.layout, trainable, device_type, needs_model)
    torch.manual_seed(options.seed)

    def build():
        with torch.device("meta"):
            model = VisionLanguageModel(config)
        apply_precision(model, precision)
        return parallelize(model, dims, seed=options.seed)

    pmodel = build()
    apply_trainable(pmodel, trainable)
    optimizer = build_optimizer(pmodel.named_parameters(), OptimConfig(lr=1e-6), device_type)
    device = next(iter(pmodel.parameters())).device

    def autocast():
        if dtype == "bf16" and dims.layout.dp == 1:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        import contextlib
        return contextlib.nullcontext()

    def batches_of(shared_prefix=None):  # the same pairs and pixels in either layout
        return synthetic_batches(config, options, np.random.default_rng(options.seed), shared_prefix)

    generator = np.random.default_rng([options.seed, 1])
    batches = batches_of()
    dpo = DPOConfig()
    reference_model = None
    reference = None
    if options.stage == "dpo":
        if needs_model:
            reference_model = build()
            if options.compare_naive:  # else ln 2 whatever the log-probs: the check could not fail
                _perturb(reference_model, options.seed + 1, REFERENCE_NOISE)
            for p in reference_model.parameters():
                p.requires_grad_(False)
        if options.reference == "online":
            reference = OnlineReference(reference_model)
        else:
            # What the precompute pass would have stored: the reference model's sums (or random values).
            ids = [i for batch in batches for i in batch.pair_ids]
            if reference_model is not None and options.only != "naive":
                sums = OnlineReference(reference_model).logps([b.to(device) for b in batches_of(False)], autocast)
                values = torch.cat(sums).tolist()
            else:
                values = generator.normal(-50, 5, 2 * len(ids)).tolist()
            reference = PrecomputedReference({i: values[2 * k:2 * k + 2] for k, i in enumerate(ids)},
                                             "the bench's reference")
    runner = StepRunner(options.stage, pmodel, config, trainable=trainable, dpo=dpo, reference=reference,
                        autocast=autocast)

    flops = sum(data_flops(b, config, trainable, options.reference == "online" and options.stage == "dpo")
                for b in batches)
    tokens = sum(b.num_tokens for b in batches)

    def optimised():
        return _optimised_step(runner, optimizer, batches)

    if options.only == "optimised":
        return _step_memory({"optimised": optimised}, device)["optimised"]
    results = {"stage": options.stage, "preset": options.preset, "device": torch.cuda.get_device_name()
               if device_type == "cuda" else "cpu", "dtype": dtype, "fp8": options.fp8, "world_size": dims.layout.world_size,
               "micro_batches": options.micro_batches, "rows": options.rows,
               "seq_len": batches[0].input_ids.shape[1], "tokens_per_step": tokens,
               "images_per_step": sum(len(b.images) for b in batches),
               "model_flops_per_step": flops, "reference": options.reference if options.stage == "dpo" else None,
               "dpo_layout": options.dpo_layout if options.stage == "dpo" else None}
    if options.compare_layouts:
        results.update(_compare_layouts(runner, optimizer, batches_of, options, device, config, trainable, dtype,
                                        dims.layout.world_size))
        return results
    if not options.compare_naive:
        if device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        results["optimised"] = _time({"optimised": optimised}, options, device, {"optimised": flops}, tokens,
                                     dims.layout.world_size, "fp8" if options.fp8 != "none" else dtype)["optimised"]
        results["optimised"]["peak_memory_gb"] = _process_peak_memory_gb(device)
        return results

    policy = pmodel.modules[0]
    naive_ref = reference_model.modules[0]
    # The naive step reads each pair's prompt twice, as others do, and shifts the labels itself.
    naive_batches, naive_labels = synthetic_batches(config, options, np.random.default_rng(options.seed), False,
                                                    return_labels=True)

    def naive():
        loss, _ = naive_dpo_step(policy, naive_ref, naive_batches, naive_labels, dpo, autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    if options.only == "naive":
        return _step_memory({"naive": naive}, device)["naive"]
    # Same weights, same batch: both steps must give the same loss and log-probs before anything is timed.
    optimised_loss = _optimised_loss(runner, optimizer, batches)
    with torch.no_grad(), autocast():
        sums = pmodel.forward_only([b.to(device) for b in batches], sequence_sums).outputs
    optimised_logps = torch.cat([s.float().cpu().reshape(-1, 2) for s in sums])
    naive_loss, naive_logps = naive_dpo_step(policy, naive_ref, naive_batches, naive_labels, dpo, autocast)
    optimizer.zero_grad(set_to_none=True)
    order = [i for b in naive_batches for i in b.pair_ids]
    if order != [i for b in batches for i in b.pair_ids]:
        raise BenchCheckFailed("the optimised and naive batches hold different pairs")
    results["loss_check"] = check_agreement(optimised_loss, float(naive_loss), optimised_logps, naive_logps, dtype)
    if device_type == "cuda":
        memory = _step_memory({"optimised": optimised, "naive": naive}, device)
    else:
        memory = {name: _in_child(dataclasses.replace(options, only=name, compare_naive=name == "naive"))
                  for name in ("optimised", "naive")}
    # The two steps alternate, so a machine that slows down or speeds up during the run affects both.
    timed = _time({"optimised": optimised, "naive": naive}, options, device,
                  {"optimised": flops, "naive": _naive_flops(naive_batches, config)}, tokens, 1, dtype)
    for name in timed:
        timed[name].update(memory[name])
    results.update(timed)
    results["speedup_vs_naive"] = results["naive"]["step_time_s"] / results["optimised"]["step_time_s"]
    results["memory_naive_over_optimised"] = memory["naive"]["peak_memory_gb"] / memory["optimised"]["peak_memory_gb"]
    # A tiny model's step can stay under the high-water mark its set-up left: no ratio then.
    optimised_step = memory["optimised"]["step_memory_gb"]
    results["step_memory_naive_over_optimised"] = (memory["naive"]["step_memory_gb"] / optimised_step
                                                   if optimised_step > 2**-10 else None)
    return results


def check_agreement(optimised_loss: float, naive_loss: float, optimised_logps: torch.Tensor,
                    naive_logps: torch.Tensor, dtype: str) -> dict:
    """The loss check: both steps' DPO loss and ``[P, 2]`` policy log-prob sums agree within
    :data:`CHECK_TOLERANCE` (relative), on a loss far enough from ln 2 to mean something. → the figures;
    raises :class:`BenchCheckFailed` otherwise."""
    tolerance = CHECK_TOLERANCE[dtype]
    loss_rel = abs(optimised_loss - naive_loss) / max(abs(naive_loss), 1e-12)
    logps_rel = float((optimised_logps - naive_logps).abs().max() / naive_logps.abs().max().clamp(min=1e-12))
    out = {"optimised": optimised_loss, "naive": naive_loss, "abs_diff": abs(optimised_loss - naive_loss),
           "rel_diff": loss_rel, "logps_rel_diff": logps_rel, "tolerance": tolerance,
           "distance_from_ln2": abs(naive_loss - math.log(2))}
    if not math.isfinite(naive_loss) or out["distance_from_ln2"] <= MIN_DISTANCE_FROM_LN2:
        raise BenchCheckFailed(f"the loss check is void: the naive DPO loss {naive_loss:.6f} is within "
                               f"{MIN_DISTANCE_FROM_LN2} of ln 2, which any log-probs give when policy = reference")
    if not loss_rel <= tolerance or not logps_rel <= tolerance:
        raise BenchCheckFailed(f"the optimised and naive DPO steps disagree on the same weights and pairs: loss "
                               f"{optimised_loss:.6f} vs {naive_loss:.6f} (relative {loss_rel:.2e}), policy log-prob "
                               f"sums relative {logps_rel:.2e}; the bound is {tolerance:g} ({dtype})")
    return out


def _host_memory_gb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (high-water mark) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    raise BenchError(f"no {field} in /proc/self/status")


def _reset_host_peak() -> bool:
    """Resets this process's VmHWM to its current RSS (Linux >= 4.0: clear_refs 5); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _step_memory(steps: dict, device: torch.device, repeats: int = 2) -> dict:
    """Per step function: the peak memory over ``repeats`` calls (``peak_memory_gb``) and what the step
    adds at that peak over what was held before it (``step_memory_gb``). CUDA: each after a warm call
    and ``reset_peak_memory_stats``. CPU: the resident set's high-water mark, reset before the steps
    where Linux allows (else the process's, set-up included); call it in a fresh process per path
    (``_in_child``), so AdamW's first-step moments count in the step's figure."""
    out = {}
    for name, step in steps.items():
        if device.type == "cuda":
            step()
            _sync(device)
            torch.cuda.reset_peak_memory_stats()
            before, how = torch.cuda.memory_allocated() / 2**30, "reset peak stats"
        else:
            reset = _reset_host_peak()
            before = _host_memory_gb("VmRSS")
            how = "own process, peak reset" if reset else "own process"
        for _ in range(repeats):
            step()
        _sync(device)
        peak = _process_peak_memory_gb(device) if device.type == "cuda" else _host_memory_gb("VmHWM")
        out[name] = {"peak_memory_gb": peak, "step_memory_gb": peak - before, "memory_measured": how,
                     "memory_pid": os.getpid()}
    return out


def _in_child(options: BenchOptions) -> dict:
    """``run_benchmark(options)`` in a fresh spawned process (one path's own memory high-water mark)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_benchmark, (options,))


def _optimised_step(runner, optimizer, batches) -> float:
    """One optimised training step on ``batches``; → its loss (the mean over the step's pairs or tokens)."""
    result = runner.run(batches)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(result.sums["loss_sum"]) / max(result.global_count, 1)


def _optimised_loss(runner, optimizer, batches) -> float:
    """The optimised step's loss on ``batches`` at the current weights, which stay as they are."""
    optimizer.zero_grad(set_to_none=True)
    result = runner.run(batches)
    optimizer.zero_grad(set_to_none=True)
    return float(result.sums["loss_sum"]) / max(result.global_count, 1)


def _compare_layouts(runner, optimizer, batches_of, options: BenchOptions, device, config, trainable, dtype: str,
                     world: int) -> dict:
    """The optimised DPO step on the same pairs laid out ``separate`` and ``shared_prefix``, alternating:
    language-model tokens per pair, padding, the losses of both (the same pairs and weights: they must
    agree), step times and their ratio."""
    layouts = {"separate": batches_of(False), "shared_prefix": batches_of(True)}
    out, steps, flops = {}, {}, {}
    for name, batches in layouts.items():
        pairs = sum(b.num_pairs for b in batches)
        tokens = sum(b.num_tokens for b in batches)
        padding = sum(b.num_padding_tokens for b in batches)
        out[name] = {"lm_tokens_per_pair": tokens / pairs, "padding_fraction": padding / (tokens + padding),
                     "loss": _optimised_loss(runner, optimizer, batches)}
        flops[name] = sum(data_flops(b, config, trainable, options.reference == "online") for b in batches)
        steps[name] = functools.partial(_optimised_step, runner, optimizer, batches)
    losses = [out[name]["loss"] for name in layouts]
    out["loss_check"] = {"abs_diff": abs(losses[0] - losses[1]), "rel_diff": abs(losses[0] - losses[1])
                         / max(abs(losses[0]), 1e-12)}
    if not out["loss_check"]["rel_diff"] <= CHECK_TOLERANCE["fp32"]:
        raise BenchCheckFailed(f"the two layouts give different DPO losses on the same pairs: {losses}")
    tokens = sum(b.num_tokens for b in layouts["separate"])
    timed = _time(steps, options, device, flops, tokens, world, "fp8" if options.fp8 != "none" else dtype)
    for name in layouts:
        out[name].update(timed[name])
    out["token_saving"] = 1 - out["shared_prefix"]["lm_tokens_per_pair"] / out["separate"]["lm_tokens_per_pair"]
    out["speedup_shared_vs_separate"] = out["separate"]["step_time_s"] / out["shared_prefix"]["step_time_s"]
    return out


def _naive_flops(batches, config) -> float:
    """Model FLOPs of the naive step as it runs (for its own TFLOP/s; MFU compares useful work)."""
    from ..profiling import attended_pairs, forward_flops
    total = 0.0
    for b in batches:
        lengths, prefix_lengths = b.sample_segments()
        fwd = forward_flops(config, num_images=len(b.pixel_values), num_tokens=b.num_tokens,
                            attention_pairs=attended_pairs(lengths, prefix_lengths=prefix_lengths),
                            num_labels=b.input_ids.numel())
        total += 4 * fwd.total  # policy forward + backward (3x) and the reference forward
    return total


def _time(steps: dict, options: BenchOptions, device, flops: dict, tokens: int, world: int, dtype: str) -> dict:
    """Runs the named step functions in turn (warm-up, then timed); → per step: median time, throughput."""
    losses = {name: [] for name in steps}
    times = {name: [] for name in steps}
    for _ in range(options.warmup):
        for name, step in steps.items():
            losses[name].append(step())
    _sync(device)
    for _ in range(options.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            losses[name].append(step())
            _sync(device)
            times[name].append(time.perf_counter() - start)
    name_ = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_tflops(name_, dtype)
    out = {}
    for name in steps:
        step_time = float(np.median(times[name]))
        tflops = flops[name] / step_time / world / 1e12
        out[name] = {"step_time_s": step_time, "step_times_s": times[name], "tokens_per_s": tokens / step_time,
                     "tokens_per_s_per_device": tokens / step_time / world, "tflops_per_device": tflops,
                     "mfu": tflops / peak if peak else None, "first_loss": losses[name][0],
                     "losses": losses[name]}
    return out
