"""``pivot-mega bench``: training-step throughput on synthetic batches of a model's real shapes.

The batch: ``micro_batches`` micro-batches of ``rows`` packed rows of ``seq_len`` tokens. For DPO each
row holds preference pairs: two sequences (image tokens, a prompt, a response) that show the same
image; for the other stages each row holds sequences of the same make-up. Tokens and pixels are
random (seeded); the step is the trainer's own (``StepRunner``) plus the optimizer step.

``--compare-naive`` also times the DPO step as simple implementations write it, on the same model,
optimizer and batch, in the same process: full ``[B, S, V]`` logits and ``log_softmax`` for every
position, each sequence encoding its own copy of the image, and the reference model's forward every
step. Its loss is the optimised step's (checked, and reported), so the ratio compares like with like.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
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
from .steps import StepRunner, data_flops


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


def model_config_for(preset: str, overrides: list[str] = ()) -> ModelConfig:
    path = model_preset_path(preset) if preset in MODEL_PRESETS else Path(preset)
    if not path.is_file():
        raise FileNotFoundError(f"bench preset {preset!r}: neither one of {sorted(MODEL_PRESETS)} "
                                f"nor a model config file")
    return load_model_config(path, list(overrides))


def synthetic_batches(config: ModelConfig, options: BenchOptions, generator: np.random.Generator,
                      shared_prefix: bool | None = None) -> list:
    """The step's MicroBatches (images decoded already: random SigLIP-range pixels).

    Rows of ``--seq-len`` tokens in the separate layout: one pair (two sequences of half a row), or two
    samples. ``shared_prefix`` (default: ``--dpo-layout``) lays the same pairs out as ``prefix | chosen |
    rejected``, in rows as long as that needs; the same generator state gives the same tokens and
    pixels either way.
    """
    shared_prefix = options.dpo_layout == "shared_prefix" if shared_prefix is None else shared_prefix
    tokens = config.num_image_tokens
    seq_len = options.seq_len or 4 * tokens
    pair = options.stage == "dpo"
    per_row = 2  # sequences per row: a pair, or two samples
    sequence_len = seq_len // per_row
    text = sequence_len - tokens
    if text < 4:
        raise ValueError(f"--seq-len {seq_len}: rows must hold {per_row} sequences of {tokens} image tokens "
                         f"plus text; give at least {per_row * (tokens + 4)}")
    response = options.response_len or max(1, text // 4)
    if response >= text:
        raise ValueError(f"--response-len {response} leaves no prompt in {text} text tokens per sequence")
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
    batches, index = [], 0
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
        distinct = list(dict.fromkeys(batch.image_refs))
        where = {ref: k for k, ref in enumerate(distinct)}
        batch.images = torch.from_numpy(generator.uniform(-1, 1, (len(distinct), 3, size, size)).astype(np.float32))
        if len(distinct) != len(batch.image_refs):
            batch.image_index = torch.tensor([where[ref] for ref in batch.image_refs], dtype=torch.int64)
        batch.global_samples, batch.global_tokens = batch.num_samples, batch.num_tokens
        batch.global_label_tokens = batch.num_label_tokens
        batches.append(batch)
    return batches


def naive_dpo_step(policy: VisionLanguageModel, reference: VisionLanguageModel, batches: list, config: DPOConfig,
                   autocast) -> torch.Tensor:
    """The DPO step written plainly: full logits, log_softmax everywhere, each sequence encodes its image,
    the reference model runs its forward. Gradients accumulate in ``policy``; → the mean loss."""
    num_pairs = sum(b.num_pairs for b in batches)
    total = torch.zeros(())
    device = next(policy.parameters()).device
    for batch in batches:
        packed = batch.packed.to(device)
        # Dense [R, S] next-token targets (IGNORE_INDEX: none) and the segment of each position.
        targets = batch.targets.dense(batch.shape).to(device)
        segments = packed.segment_ids.reshape(-1)

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
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_benchmark(options: BenchOptions) -> dict:
    if options.stage not in PIVOT_STAGE_DEFAULTS:
        raise ValueError(f"--stage {options.stage!r}: one of {sorted(PIVOT_STAGE_DEFAULTS)}")
    if options.compare_naive and options.stage != "dpo":
        raise ValueError("--compare-naive times the naive DPO step: use --stage dpo")
    config = model_config_for(options.preset, options.overrides)
    if options.attention:
        config.attention = options.attention
    config.activation_checkpointing = options.activation_checkpointing
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = options.dtype or ("bf16" if device_type == "cuda" else "fp32")
    if dtype == "bf16" and device_type != "cuda":
        raise ValueError("--dtype bf16 needs a CUDA device (CPU runs fp32)")
    precision = PrecisionConfig(fp8=options.fp8)
    check_precision(precision, device_type)
    parallel = ParallelConfig(mixed_precision="bf16" if dtype == "bf16" and dist.is_initialized()
                              and dist.get_world_size() > 1 else "fp32")
    dims = build_mesh(parallel, config, device_type)
    torch.manual_seed(options.seed)
    trainable = tuple(PIVOT_STAGE_DEFAULTS[options.stage]["trainable"])

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
    if options.compare_layouts and options.stage != "dpo":
        raise ValueError("--compare-layouts times the two DPO pair layouts: use --stage dpo")
    dpo = DPOConfig()
    reference_model = None
    reference = None
    if options.stage == "dpo":
        needs_model = options.reference == "online" or options.compare_naive
        if needs_model:
            reference_model = build()
            for p in reference_model.parameters():
                p.requires_grad_(False)
        if options.reference == "online":
            reference = OnlineReference(reference_model)
        else:
            # What the precompute pass would have stored: the reference model's sums (or random values).
            ids = [i for batch in batches for i in batch.pair_ids]
            if reference_model is not None:
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
        return results

    if dims.layout.world_size != 1:
        raise ValueError("--compare-naive runs in one process (the naive step has no parallelism)")
    policy = pmodel.modules[0]
    naive_ref = reference_model.modules[0]
    naive_batches = batches_of(False)  # the naive step reads each pair's prompt twice, as others do

    def naive():
        loss = naive_dpo_step(policy, naive_ref, naive_batches, dpo, autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    # Same weights, same batch: both steps must give the same loss before anything is timed.
    optimised_loss = _optimised_loss(runner, optimizer, batches)
    naive_loss = float(naive_dpo_step(policy, naive_ref, naive_batches, dpo, autocast))
    optimizer.zero_grad(set_to_none=True)
    results["loss_check"] = {"optimised": optimised_loss, "naive": naive_loss,
                             "abs_diff": abs(optimised_loss - naive_loss)}
    # The two steps alternate, so a machine that slows down or speeds up during the run affects both.
    timed = _time({"optimised": optimised, "naive": naive}, options, device,
                  {"optimised": flops, "naive": _naive_flops(naive_batches, config)}, tokens, 1, dtype)
    results.update(timed)
    results["speedup_vs_naive"] = results["naive"]["step_time_s"] / results["optimised"]["step_time_s"]
    return results


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
    if out["loss_check"]["rel_diff"] > 1e-4:
        raise RuntimeError(f"the two layouts give different DPO losses on the same pairs: {losses}")
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
                     "losses": losses[name], "peak_memory_gb": _peak_memory_gb(device)}
    return out
