#!/usr/bin/env python3
"""One prepared check of the CUDA paths on one GPU: correctness against fp32/fp64 references, then speed.

    python tools/gpu_check.py --out gpu_check             # one CUDA GPU, under 8 minutes
    python tools/gpu_check.py --cpu-dry-run --out /tmp/c  # the same script end to end on CPU, tiny sizes
    python tools/gpu_check.py --only attention logprob    # some sections (attention logprob dpo speed)

Writes ``gpu_check.json`` (the environment, and each check's figures, bounds and verdict) and
``gpu_check.md`` (the same as tables) in ``--out``. Exit status 0 when every correctness check passed,
1 when one failed or raised; a section that raises is recorded with its error and the others still run.
The speed goals are reported against their targets, not enforced.

Correctness (each against a reference it does not share code with):
- attention: every packed attention backend available (SDPA's mask, varlen, flex_attention, and
  flash-attn and Transformer Engine where they import), forward and q/k/v gradients, on plain packed rows
  and on the shared-prefix DPO layout, against SDPA run one segment at a time in fp32 on the same
  (rounded) inputs;
- logprob: the Triton label log-prob kernel and the chunked path (fp32 and bf16, V = 151,936), log-probs
  and gradients against fp64 ``log_softmax``;
- dpo: a full DPO step (forward, backward, AdamW step, the next step's loss) of a small model on the GPU
  in bf16 autocast (the one-GPU trainer), under FSDP2 bf16 mixed precision, the same with ``compile:
  true``, and with torchao float8 linears, each against the same step of its fp32 twin on the CPU.
Speed (as a user runs it, each in a fresh process):
- the measured dense matmul peak (bf16, and fp8 through ``torch._scaled_mm``), for MFU;
- ``tools/bench_logprob.py --device cuda`` (naive, chunked, triton, liger);
- ``pivot-mega bench --stage dpo --preset pivot-1.5b --compare-naive`` in bf16 and with ``--fp8 torchao``.

``--cpu-dry-run`` runs every section at tiny sizes in fp32 (the Triton kernel in Triton's interpreter,
bf16 replaced by fp32, FSDP2 on one gloo rank), so the script is proven before it meets a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("attention", "logprob", "dpo", "speed")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every shape the script uses; ``GPU`` for a real run, ``DRY`` for ``--cpu-dry-run``."""

    # attention: rows of packed segments, Qwen2.5-1.5B's heads
    attention_rows: tuple[tuple[int, ...], ...]
    attention_prefix_row: tuple[int, int, int, int]  # prefix, chosen, rejected, padding
    heads: int
    kv_heads: int
    head_dim: int
    # logprob: N tokens, H hidden, V vocabulary
    logprob_shape: tuple[int, int, int]
    # dpo: the model preset, micro-batches x rows
    dpo_preset: str
    dpo_micro_batches: int
    dpo_rows: int
    # speed
    matmul_size: int
    bench_logprob_args: tuple[str, ...]
    bench_args: tuple[str, ...]


GPU = Sizes(attention_rows=((1024, 2048, 1024), (4096,)), attention_prefix_row=(1536, 1024, 896, 640),
            heads=12, kv_heads=2, head_dim=128, logprob_shape=(4096, 1536, 151936), dpo_preset="small",
            dpo_micro_batches=2, dpo_rows=2, matmul_size=8192,
            bench_logprob_args=("--device", "cuda", "--dtype", "bf16", "--tokens", "8192", "--hidden", "1536",
                                "--vocab", "151936"),
            bench_args=("--preset", "pivot-1.5b", "--seq-len", "4096", "--rows", "1", "--steps", "5",
                        "--warmup", "2"))
DRY = Sizes(attention_rows=((7, 12, 13), (32,)), attention_prefix_row=(12, 9, 7, 4), heads=4, kv_heads=2,
            head_dim=16, logprob_shape=(40, 32, 300), dpo_preset="tiny", dpo_micro_batches=2, dpo_rows=1,
            matmul_size=256,
            bench_logprob_args=("--device", "cpu", "--dtype", "fp32", "--tokens", "64", "--hidden", "32",
                                "--vocab", "512", "--impls", "naive", "chunked"),
            bench_args=("--preset", "tiny", "--steps", "1", "--warmup", "1"))

# Bounds. Errors are max |got - want| / max |want| (log-probs: max absolute error in nats) against a
# reference fed the same rounded inputs, so they measure the kernel, not the input format.
# bf16 keeps 8 significant bits (half an ulp = 2^-9 = 2e-3 relative): an output rounded to bf16 is off
# by up to 2e-3 of its magnitude, and sums of bf16 products accumulated in fp32 add little to that.
ATTENTION_BOUND = {"fp32": 1e-5, "bf16": 1.5e-2}  # outputs and q/k/v gradients
LOGPROB_BOUND = {  # (log-prob nats, gradients)
    "fp32": (1e-4, 1e-4),  # fp32 dots (ieee), fp32 exp/log over 151,936 logits
    "bf16": (1e-3, 1e-2),  # fp32 accumulation; gradients written in bf16
}
# A DPO step against its fp32 CPU twin: |loss - twin| / twin, |grad norm - twin| / twin, the cosine
# of all gradients together, and the worst tensor's cosine. bf16 rounds every activation (2e-3) through
# ~10 layers; float8 (e4m3 forward, e5m2 gradients: 2^-4, 2^-3 relative) moves it about ten times more.
DPO_BOUND = {
    "fp32": dict(loss=1e-5, grad_norm=1e-4, cosine=0.99999, worst_cosine=0.9999),
    "bf16": dict(loss=2e-2, grad_norm=5e-2, cosine=0.995, worst_cosine=0.95),
    "float8": dict(loss=5e-2, grad_norm=0.15, cosine=0.98, worst_cosine=0.8),
}
# The speed goals (reported, not enforced).
GOALS = {"triton_time_vs_naive": 0.7, "triton_peak_vs_naive": 1 / 20, "dpo_bf16_mfu": 0.45,
         "fp8_tokens_vs_bf16": 1.2}


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every section on CPU at tiny sizes (fp32, Triton's interpreter)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="sections to run (default all)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds for each speed command (default 240)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class Check:
    """One line of the report. ``ok``: True/False for a checked bound, None for a figure or a skip."""

    section: str
    name: str
    ok: bool | None
    figures: dict
    bounds: dict = dataclasses.field(default_factory=dict)
    note: str = ""


def within(figures: dict, bounds: dict) -> bool:
    """Every figure named in ``bounds`` is within it: at most the bound, or for cosines at least it."""
    for key, bound in bounds.items():
        value = figures[key]
        if value is None or (value < bound if "cosine" in key else value > bound) or math.isnan(value):
            return False
    return True


def relative_error(got, want) -> float:
    """max |got - want| / max |want|, in fp64."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


# ------------------------------------------------------------------------------------------------
# Environment and the measured matmul peak


def environment(device) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "host": platform.node()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(multiprocessors=props.multi_processor_count, memory_gib=props.total_memory / 2 ** 30,
                   capability=f"{props.major}.{props.minor}")
    for name in ("triton", "transformers", "torchao", "liger_kernel", "flash_attn", "transformer_engine"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "installed")
        except Exception as error:  # noqa: BLE001 (a broken install is reported, not fatal)
            env[name] = None if isinstance(error, ImportError) else f"fails to import: {error}"
    return env


def _timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up, synchronising the device around each."""
    import statistics

    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device, size: int) -> list[Check]:
    """Dense matmul TFLOP/s of ``size``^3 products: bf16 (fp32 on CPU), and fp8 e4m3 on CUDA."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen, device=device).to(dtype) for _ in range(2))
    flops = 2 * size ** 3
    checks = [Check("speed", f"matmul {dtype_name(dtype)}", None,
                    {"tflops": flops / _timed(lambda: a @ b, device, 10) / 1e12, "size": size})]
    if device.type == "cuda":
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major second operand
        one = torch.ones((), device=device)
        try:
            seconds = _timed(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                             device, 10)
            checks.append(Check("speed", "matmul fp8", None, {"tflops": flops / seconds / 1e12, "size": size}))
        except RuntimeError as error:
            checks.append(Check("speed", "matmul fp8", None, {}, note=f"torch._scaled_mm: {error}"))
    return checks


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float", "fp")


# ------------------------------------------------------------------------------------------------
# Attention backends against one-segment-at-a-time SDPA


def segment_attention(q, k, v, lengths: list[list[int]], prefix: list[int] | None):
    """SDPA in fp32, one segment at a time: a segment's queries against its own keys (causal), and for a
    segment with a prefix, first all of the prefix's keys. ``lengths`` per row; ``prefix`` per segment
    (numbered over all rows) the segment whose keys it also sees, or -1."""
    import torch
    import torch.nn.functional as F

    out = torch.zeros_like(q, dtype=torch.float32)
    groups = q.shape[2] // k.shape[2]
    spans, index = [], 0
    for row, row_lengths in enumerate(lengths):
        start = 0
        for n in row_lengths:
            spans.append((row, start, start + n))
            start += n
            index += 1
    for segment, (row, start, end) in enumerate(spans):
        n = end - start
        keys = [(start, end)]
        if prefix is not None and prefix[segment] >= 0:
            _, p_start, p_end = spans[prefix[segment]]
            keys.insert(0, (p_start, p_end))
        kk, vv = (torch.cat([t[row, a:b] for a, b in keys]).float() for t in (k, v))
        m = kk.shape[0]
        visible = torch.ones(n, m, dtype=torch.bool, device=q.device)
        visible[:, m - n:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        o = F.scaled_dot_product_attention(q[row, start:end].float().transpose(0, 1),
                                           kk.repeat_interleave(groups, 1).transpose(0, 1),
                                           vv.repeat_interleave(groups, 1).transpose(0, 1), attn_mask=visible)
        out[row, start:end] = o.transpose(0, 1)
    return out


def attention_checks(device, sizes: Sizes, dtype) -> list[Check]:
    import torch

    from pivot_mega.batch import PackedSeqs
    from pivot_mega.models.layers import SEGMENTS_ONLY, attention, available_backends

    name = dtype_name(dtype)
    bound = ATTENTION_BOUND[name]
    p, c, r, pad = sizes.attention_prefix_row
    layouts = {
        "packed": ([list(row) for row in sizes.attention_rows], None),
        "shared prefix": ([[p, c, r, pad], [sum(sizes.attention_rows[1])]], [-1, 0, 0, -1, -1]),
    }
    checks = []
    for layout, (lengths, prefix) in layouts.items():
        seqlen = sum(lengths[0])
        assert all(sum(row) == seqlen for row in lengths), lengths
        packed = PackedSeqs.from_lengths(lengths, prefix=prefix, device=device)
        gen = torch.Generator(device=device).manual_seed(len(checks))
        shape = (len(lengths), seqlen)
        q = torch.randn(*shape, sizes.heads, sizes.head_dim, generator=gen, device=device).to(dtype)
        k, v = (torch.randn(*shape, sizes.kv_heads, sizes.head_dim, generator=gen, device=device).to(dtype)
                for _ in range(2))
        grad_out = torch.randn(*shape, sizes.heads, sizes.head_dim, generator=gen, device=device).to(dtype)
        leaves = [t.float().requires_grad_() for t in (q, k, v)]
        want = segment_attention(*leaves, lengths, prefix)
        want.backward(grad_out.float())
        for backend in available_backends(device):
            label = f"{backend}, {layout}, {name}"
            if prefix is not None and backend in SEGMENTS_ONLY:
                checks.append(Check("attention", label, None, {}, note="takes no shared prefix (refused: tested)"))
                continue
            backward = device.type == "cuda" or backend != "flex"  # flex has no CPU backward in torch
            inputs = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
            got = attention(*inputs, causal=True, packed=packed, backend=backend)
            figures = {"out": relative_error(got, want)}
            if backward:
                got.backward(grad_out)
                figures.update({f"d{n}": relative_error(t.grad, leaf.grad)
                                for n, t, leaf in zip("qkv", inputs, leaves)})
            bounds = {key: bound for key in figures}
            checks.append(Check("attention", label, within(figures, bounds), figures, bounds,
                                "" if backward else "forward only: flex_attention has no CPU backward"))
    return checks


# ------------------------------------------------------------------------------------------------
# The label log-prob head against fp64


def logprob_checks(device, sizes: Sizes, dtypes, impls=("triton", "chunked")) -> list[Check]:
    import torch

    from pivot_mega.batch import IGNORE_INDEX
    from pivot_mega.kernels.linear_logprob import linear_logprob

    n, h, v = sizes.logprob_shape
    checks = []
    for dtype in dtypes:
        gen = torch.Generator(device=device).manual_seed(1)
        hidden = torch.randn(n, h, generator=gen, device=device).to(dtype)
        weight = (torch.randn(v, h, generator=gen, device=device) / h ** 0.5).to(dtype)
        labels = torch.randint(0, v, (n,), generator=gen, device=device)
        labels[torch.randperm(n, generator=gen, device=device)[: n // 8]] = IGNORE_INDEX
        grad_out = torch.randn(n, generator=gen, device=device)
        # fp64 reference on the same (rounded) inputs
        h64, w64 = (t.double().requires_grad_() for t in (hidden, weight))
        logits = h64 @ w64.T
        want = torch.log_softmax(logits, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
        want = torch.where(labels != IGNORE_INDEX, want, 0.0)
        (want * grad_out.double()).sum().backward()
        del logits
        name = dtype_name(dtype)
        for impl in impls:
            hh, ww = (t.detach().clone().requires_grad_() for t in (hidden, weight))
            got = linear_logprob(hh, ww, labels, impl=impl)
            (got * grad_out).sum().backward()
            figures = {"logprob": float((got.detach().double() - want.detach()).abs().max()),
                       "grad_hidden": relative_error(hh.grad, h64.grad),
                       "grad_weight": relative_error(ww.grad, w64.grad)}
            lp_bound, grad_bound = LOGPROB_BOUND[name]
            bounds = {"logprob": lp_bound, "grad_hidden": grad_bound, "grad_weight": grad_bound}
            checks.append(Check("logprob", f"{impl}, N={n} H={h} V={v}, {name}", within(figures, bounds),
                                figures, bounds))
            del hh, ww, got
        del h64, w64, want
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return checks


# ------------------------------------------------------------------------------------------------
# A DPO step on the device against its fp32 twin on the CPU


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    precision: str  # "fp32" | "bf16" | "float8": picks DPO_BOUND
    autocast: bool = False  # bf16 autocast (what the trainer does on one GPU)
    fsdp: bool = False      # FSDP2 on the one-rank data-parallel mesh, with its mixed-precision policy
    compile: bool = False
    float8: bool = False


def dpo_variants(cuda: bool) -> list[Variant]:
    if cuda:
        return [Variant("bf16 autocast", "bf16", autocast=True),
                Variant("bf16 FSDP2", "bf16", fsdp=True),
                Variant("bf16 FSDP2 + compile", "bf16", fsdp=True, compile=True),
                Variant("float8 (torchao) + bf16 FSDP2", "float8", fsdp=True, float8=True)]
    return [Variant("fp32 FSDP2", "fp32", fsdp=True),
            Variant("fp32 FSDP2 + compile", "fp32", fsdp=True, compile=True),
            Variant("float8 (torchao) + fp32 FSDP2", "float8", fsdp=True, float8=True)]


def _init_process_group(cuda: bool) -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(0)
    # One rank; gloo for the CPU twin's mesh beside nccl for the GPU's.
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)


class DPOSetup:
    """The model config, batches and reference shared by every variant and the twin."""

    def __init__(self, sizes: Sizes, seed: int = 0):
        import numpy as np

        from pivot_mega.training.bench import BenchOptions, model_config_for, synthetic_batches

        self.seed = seed
        self.config = model_config_for(sizes.dpo_preset)
        self.config.attention = "auto"
        options = BenchOptions(stage="dpo", preset=sizes.dpo_preset, micro_batches=sizes.dpo_micro_batches,
                               rows=sizes.dpo_rows, seed=seed)
        self.batches = synthetic_batches(self.config, options, np.random.default_rng(seed))
        self.reference = None

    def build(self, variant: Variant, device_type: str):
        """→ (ParallelModel, StepRunner, optimizer) of ``variant`` on ``device_type``."""
        import torch

        from pivot_mega.parallel import ParallelConfig, build_mesh, parallelize
        from pivot_mega.parallel.data_parallel import apply_fsdp
        from pivot_mega.models.mllm import VisionLanguageModel
        from pivot_mega.precision import PrecisionConfig, apply_precision
        from pivot_mega.training.losses import DPOConfig
        from pivot_mega.training.optim import PIVOT_STAGE_DEFAULTS, OptimConfig, apply_trainable, build_optimizer
        from pivot_mega.training.steps import StepRunner

        mixed = "bf16" if variant.precision != "fp32" and device_type == "cuda" else "fp32"
        dims = build_mesh(ParallelConfig(mixed_precision=mixed, compile=variant.compile), self.config, device_type)
        with torch.device("meta"):
            model = VisionLanguageModel(self.config)
        if variant.float8:
            apply_precision(model, PrecisionConfig(fp8="torchao"))
        pmodel = parallelize(model, dims, seed=self.seed)
        if variant.fsdp:  # parallelize shards only over dp > 1; one rank shows FSDP2's casts alone
            apply_fsdp(pmodel.modules[0], dims)
        trainable = tuple(PIVOT_STAGE_DEFAULTS["dpo"]["trainable"])
        apply_trainable(pmodel, trainable)
        optimizer = build_optimizer(pmodel.named_parameters(), OptimConfig(lr=1e-5), device_type)

        def autocast():
            if variant.autocast:
                return torch.autocast("cuda", dtype=torch.bfloat16)
            return contextlib.nullcontext()

        runner = StepRunner("dpo", pmodel, self.config, trainable=trainable, dpo=DPOConfig(),
                            reference=self.reference, autocast=autocast)
        return pmodel, runner, optimizer

    def twin_reference(self, twin_model) -> None:
        """Reference sums: the twin's own log-probs, moved by N(0, 1) per sequence, so that the loss is
        not log 2 and its gradients are not degenerate."""
        import torch

        from pivot_mega.training.reference import OnlineReference, PrecomputedReference

        sums = torch.cat(OnlineReference(twin_model).logps(self.batches)).double()
        sums += torch.randn(sums.shape, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
        ids = [i for batch in self.batches for i in batch.pair_ids]
        values = sums.tolist()
        self.reference = PrecomputedReference({i: values[2 * k:2 * k + 2] for k, i in enumerate(ids)},
                                              "the fp32 twin's log-probs, moved")


def _full_grads(pmodel) -> dict:
    grads = {}
    for name, param in pmodel.named_parameters():
        if param.grad is not None:
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            grads[name] = grad.detach().float().cpu()
    return grads


def dpo_step(setup: DPOSetup, variant: Variant, device_type: str) -> dict:
    """Two steps: the first's loss and gradients, then AdamW's update, then the second's loss."""
    import torch

    pmodel, runner, optimizer = setup.build(variant, device_type)
    result = runner.run(setup.batches)
    loss = float(result.sums["loss_sum"]) / result.global_count
    grads = _full_grads(pmodel)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    second = runner.run(setup.batches)
    optimizer.zero_grad(set_to_none=True)
    out = {"loss": loss, "grads": grads, "next_loss": float(second.sums["loss_sum"]) / second.global_count,
           "grad_norm": float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))}
    del pmodel, runner, optimizer
    if device_type == "cuda":
        torch.cuda.empty_cache()
    return out


def compare_steps(got: dict, twin: dict) -> dict:
    import torch

    if got["grads"].keys() != twin["grads"].keys():
        raise RuntimeError(f"the gradients name different parameters: {sorted(got['grads'].keys() ^ twin['grads'].keys())}")
    flat = [torch.cat([g[name].double().flatten() for name in twin["grads"]]) for g in (got["grads"], twin["grads"])]
    # Tensors whose gradient is zero in exact arithmetic (attention's key biases: softmax ignores a
    # shift shared by every key) hold rounding noise alone; a cosine says nothing there.
    norm = float(flat[1].norm())
    cosines = {name: float(torch.nn.functional.cosine_similarity(got["grads"][name].double().flatten(), want.double().flatten(), dim=0))
               for name, want in twin["grads"].items() if float(want.double().norm()) > 1e-6 * norm}
    worst = min(cosines, key=cosines.get)
    return {"loss": abs(got["loss"] - twin["loss"]) / abs(twin["loss"]),
            "next_loss": abs(got["next_loss"] - twin["next_loss"]) / abs(twin["next_loss"]),
            "grad_norm": abs(got["grad_norm"] - twin["grad_norm"]) / twin["grad_norm"],
            "cosine": float(torch.nn.functional.cosine_similarity(*flat, dim=0)),
            "worst_cosine": cosines[worst], "worst_tensor": worst, "near_zero_tensors": len(twin["grads"]) - len(cosines),
            "twin_loss": twin["loss"], "device_loss": got["loss"]}


def dpo_checks(device, sizes: Sizes) -> list[Check]:
    _init_process_group(device.type == "cuda")
    setup = DPOSetup(sizes)
    twin_variant = Variant("fp32 twin", "fp32")
    twin_model, _, _ = setup.build(twin_variant, "cpu")
    setup.twin_reference(twin_model)
    del twin_model
    twins = {}  # the twin differs only by float8 linears
    checks = []
    for variant in dpo_variants(device.type == "cuda"):
        key = variant.float8 and device.type != "cuda"  # a dry run's twin has float8 linears too
        if key not in twins:
            twins[key] = dpo_step(setup, dataclasses.replace(twin_variant, float8=key), "cpu")
        got = dpo_step(setup, variant, device.type)
        figures = compare_steps(got, twins[key])
        bounds = dict(DPO_BOUND[variant.precision])
        bounds["next_loss"] = bounds["loss"]
        note = "twin: fp32 on the CPU" + (", float8 linears too" if variant.float8 and device.type != "cuda" else "")
        checks.append(Check("dpo", f"{variant.name}, {sizes.dpo_preset}", within(figures, bounds), figures,
                            bounds, note))
    return checks


# ------------------------------------------------------------------------------------------------
# Speed: the benchmarks as a user runs them


def _run_json(command: list[str], json_path: Path, timeout: int) -> tuple[object, str]:
    """Runs ``command`` (which writes ``json_path``); → (its JSON, the command line). Raises with the
    command's last error line if it fails."""
    line = " ".join(command)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0 or not json_path.is_file():
        tail = [s for s in proc.stderr.splitlines() if s.strip()][-3:] or ["no output"]
        raise RuntimeError(f"`{line}` exited {proc.returncode}: " + " | ".join(tail))
    return json.loads(json_path.read_text()), line


def bench_logprob_checks(sizes: Sizes, scratch: Path, timeout: int) -> list[Check]:
    path = scratch / "bench_logprob.json"
    rows, line = _run_json([sys.executable, str(ROOT / "tools" / "bench_logprob.py"), *sizes.bench_logprob_args,
                            "--json", str(path)], path, timeout)
    naive = next((r for r in rows if r["impl"] == "naive" and "error" not in r), None)
    checks = []
    for row in rows:
        if "error" in row:
            checks.append(Check("speed", f"bench_logprob {row['impl']}", False, {}, note=row["error"]))
            continue
        figures = {"time_s": row["time_s"], "peak_mib": row["peak_mib"]}
        if naive is not None:
            figures.update(time_vs_naive=row["time_s"] / naive["time_s"], peak_vs_naive=row["peak_mib"] / naive["peak_mib"])
        note = line if row is rows[0] else ""
        if row["impl"] == "triton" and naive is not None:
            note = (f"goals: time <= {GOALS['triton_time_vs_naive']}x naive "
                    f"({'met' if figures['time_vs_naive'] <= GOALS['triton_time_vs_naive'] else 'missed'}), "
                    f"peak <= 1/20 naive ({'met' if figures['peak_vs_naive'] <= GOALS['triton_peak_vs_naive'] else 'missed'})")
        checks.append(Check("speed", f"bench_logprob {row['impl']} {row['dtype']} N={row['tokens']} "
                            f"H={row['hidden']} V={row['vocab']}", None, figures, note=note))
    return checks


def bench_dpo_checks(sizes: Sizes, scratch: Path, timeout: int, peaks: dict) -> list[Check]:
    checks, tokens = [], {}
    for fp8 in ("none", "torchao"):
        path = scratch / f"bench_dpo_{fp8}.json"
        command = [sys.executable, "-m", "pivot_mega.cli", "bench", "--stage", "dpo", *sizes.bench_args,
                   "--compare-naive", "--fp8", fp8, "--json", str(path)]
        try:
            result, line = _run_json(command, path, timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            checks.append(Check("speed", f"pivot-mega bench dpo fp8={fp8}", False, {}, note=str(error)))
            continue
        opt, naive = result["optimised"], result["naive"]
        dtype = "fp8" if fp8 != "none" else result["dtype"]
        peak = peaks.get(dtype) or peaks.get("bf16")
        figures = {"tokens_per_s": opt["tokens_per_s"], "tflops": opt["tflops_per_device"],
                   "mfu_datasheet": opt["mfu"], "mfu_measured_peak": opt["tflops_per_device"] / peak if peak else None,
                   "peak_memory_gb": opt["peak_memory_gb"], "speedup_vs_naive": result["speedup_vs_naive"],
                   "naive_peak_memory_gb": naive["peak_memory_gb"],
                   "loss_vs_naive": result["loss_check"]["abs_diff"]}
        tokens[fp8] = opt["tokens_per_s"]
        note = f"`{line}`"
        if fp8 == "none" and figures["mfu_measured_peak"] is not None:
            met = figures["mfu_measured_peak"] >= GOALS["dpo_bf16_mfu"]
            note += f"; goal MFU >= {GOALS['dpo_bf16_mfu']:.0%} of the measured peak: {'met' if met else 'missed'}"
        if fp8 != "none" and "none" in tokens:
            figures["tokens_vs_bf16"] = opt["tokens_per_s"] / tokens["none"]
            met = figures["tokens_vs_bf16"] >= GOALS["fp8_tokens_vs_bf16"]
            note += f"; goal >= {GOALS['fp8_tokens_vs_bf16']}x the bf16 tokens/s: {'met' if met else 'missed'}"
        # The optimised and naive steps start from the same weights on the same pairs.
        bounds = {"loss_vs_naive": 2e-2 if dtype != "fp32" else 1e-4}
        checks.append(Check("speed", f"pivot-mega bench dpo {dtype} {result['preset']} seq {result['seq_len']}",
                            within(figures, bounds), figures, bounds, note))
    return checks


def speed_checks(device, sizes: Sizes, scratch: Path, timeout: int) -> list[Check]:
    checks = matmul_peak(device, sizes.matmul_size)
    peaks = {c.name.split()[-1]: c.figures["tflops"] for c in checks if "tflops" in c.figures}
    checks += bench_logprob_checks(sizes, scratch, timeout)
    checks += bench_dpo_checks(sizes, scratch, timeout, peaks)
    return checks


# ------------------------------------------------------------------------------------------------
# Report


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def markdown(env: dict, checks: list[Check], failures: list[str]) -> str:
    lines = ["# gpu_check", "", "| environment | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in env.items()]
    for section in dict.fromkeys(c.section for c in checks):
        lines += ["", f"## {section}", "", "| check | verdict | figures | bounds | note |", "|---|---|---|---|---|"]
        for c in (c for c in checks if c.section == section):
            verdict = {True: "pass", False: "**FAIL**", None: "-"}[c.ok]
            figures = ", ".join(f"{k} {_format(v)}" for k, v in c.figures.items())
            bounds = ", ".join(f"{k} {'>=' if 'cosine' in k else '<='} {_format(v)}" for k, v in c.bounds.items())
            lines.append(f"| {c.name} | {verdict} | {figures} | {bounds} | {c.note} |")
    if failures:
        lines += ["", "## failures", ""] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.cpu_dry_run:
        # Before anything imports triton: its interpreter runs the kernels on CPU tensors.
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not args.cpu_dry_run:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
              "run with --cpu-dry-run to try the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    sizes = GPU if cuda else DRY
    half = torch.bfloat16 if cuda else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    env["mode"] = "cuda" if cuda else "cpu dry run"
    print(f"gpu_check on {env['device']} (torch {env['torch']}, triton {env['triton']}): {' '.join(args.only)}",
          flush=True)
    sections = {
        "attention": lambda: attention_checks(device, sizes, half),
        "logprob": lambda: logprob_checks(device, sizes, (torch.float32, half) if cuda else (torch.float32,)),
        "dpo": lambda: dpo_checks(device, sizes),
        "speed": lambda: speed_checks(device, sizes, scratch, args.timeout),
    }
    checks: list[Check] = []
    failures: list[str] = []
    timings = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        scratch = Path(tmp)
        for section in args.only:
            start = time.perf_counter()
            try:
                found = sections[section]()
            except Exception as error:  # noqa: BLE001 (recorded; the other sections still run)
                found = [Check(section, "(section)", False, {}, note=f"{type(error).__name__}: {error}")]
                traceback.print_exc()
            timings[section] = time.perf_counter() - start
            for c in found:
                print(f"  {section}: {c.name}: {({True: 'pass', False: 'FAIL', None: '-'})[c.ok]} "
                      + ", ".join(f"{k}={_format(v)}" for k, v in c.figures.items()) + (f" ({c.note})" if c.note else ""),
                      flush=True)
            checks += found
            if device.type == "cuda":
                torch.cuda.empty_cache()
    failures = [f"{c.section}: {c.name}: {c.note or c.figures}" for c in checks if c.ok is False]
    env["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    report = {"environment": env, "passed": not failures, "failures": failures, "goals": GOALS,
              "checks": [dataclasses.asdict(c) for c in checks]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(env, checks, failures))
    print(f"gpu_check: {len(checks)} checks, {len(failures)} failed, in {sum(timings.values()):.0f} s; "
          f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
