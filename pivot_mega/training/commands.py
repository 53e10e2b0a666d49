"""``pivot-mega train`` and ``pivot-mega bench``."""

from __future__ import annotations

import argparse
import sys

from ..presets import MODEL_PRESETS


def register(sub) -> dict:
    train = sub.add_parser(
        "train", help="run one PIVOT stage (pretrain_projector, pretrain_full, sft, dpo)",
        description="Runs the stage a run config describes, in one process or on every rank of torchrun / srun. "
                    "SIGTERM or SIGUSR1 finish the step, save a checkpoint and exit 0; train.resume=auto (the "
                    "default) continues from OUT/checkpoints/latest.")
    train.add_argument("config", metavar="CONFIG.yaml", help="run config (see examples/configs/train_*.yaml)")
    train.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.max_steps=100 parallel.tensor_model_parallel_size=2")

    bench = sub.add_parser(
        "bench", help="training-step throughput on synthetic data (tokens/s, TFLOP/s, MFU, memory) as JSON",
        description="Times training steps of a stage on random data of the model's shapes, after warm-up steps. "
                    "With --compare-naive, also times a naive DPO step (full-logit log_softmax, each sequence "
                    "encodes its image, the reference model runs every step) on the same model and batch, and "
                    "reports the ratio. The two must first agree on the DPO loss and the policy's per-sequence "
                    "log-probs, against a reference unlike the policy, or the command exits 1; each one's peak "
                    "memory is measured on its own (CPU: in a process of its own). Shapes that cannot work and a "
                    "training state that cannot fit in the memory available are refused before anything is "
                    "built (exit 2).")
    bench.add_argument("--stage", choices=["pretrain_projector", "pretrain_full", "sft", "dpo"], default="dpo")
    bench.add_argument("--preset", default="tiny",
                       help=f"{' | '.join(MODEL_PRESETS)}, or a model config YAML (default tiny)")
    bench.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    bench.add_argument("--seq-len", type=int, default=0, help="tokens per packed row (default: 4x the image tokens)")
    bench.add_argument("--rows", type=int, default=1, help="rows per micro-batch (default 1)")
    bench.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step (default 2)")
    bench.add_argument("--response-len", type=int, default=0,
                       help="tokens per response (default: a quarter of the text tokens of a sequence)")
    bench.add_argument("--reference", choices=["online", "precomputed"], default="precomputed",
                       help="DPO reference of the optimised step (default precomputed)")
    bench.add_argument("--compare-naive", action="store_true", help="also time the naive DPO step; report the ratio")
    bench.add_argument("--dpo-layout", choices=["shared_prefix", "separate"], default="shared_prefix",
                       help="how a pair is laid out (data.dpo_layout; default shared_prefix)")
    bench.add_argument("--compare-layouts", action="store_true",
                       help="time the optimised DPO step on the same pairs in both layouts, side by side; report "
                            "tokens per pair, padding, the loss of each and the step-time ratio")
    bench.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                       help="training dtype (default: bf16 autocast on CUDA, fp32 on CPU)")
    bench.add_argument("--attention", default=None, help="attention backend (default: the model config's)")
    bench.add_argument("--activation-checkpointing", action="store_true")
    bench.add_argument("--fp8", choices=["none", "torchao"], default="none",
                       help="torchao float8 linears (precision.fp8: torchao); MFU then against the FP8 peak")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="model config overrides, e.g. language.num_hidden_layers=4")
    bench.add_argument("--json", metavar="FILE", help="also write the results here")

    plan = sub.add_parser(
        "plan", help="will a run config fit: memory per GPU and FLOPs per step of every valid layout",
        description="Estimates, for every layout the trainer accepts (tp x pp x dp, dp sharded or replicated, "
                    "activation checkpointing off and on), the parameter, gradient, optimizer-state, activation "
                    "and working memory of the busiest GPU, and recommends the layout that fits with the most "
                    "headroom. Nothing runs on a GPU.")
    plan.add_argument("config", metavar="CONFIG.yaml", help="run config, as pivot-mega train takes")
    plan.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    plan.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    plan.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB or 141GiB (default 80GB)")
    plan.add_argument("--images-per-row", type=int, default=None, metavar="N",
                      help="images a packed row shows (default: as many as fit in data.max_seq_len, the worst case)")
    plan.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                      help="override a config key, e.g. --set data.max_seq_len=8192")
    plan.add_argument("--json", metavar="FILE", help="also write every estimate here")
    return {"train": run_train, "bench": run_bench, "plan": run_plan}


def run_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing.errors import record

    from .config import load_run_config
    from .trainer import Trainer

    from ..config import ConfigError
    from ..data.sources import DataError
    from ..models.checkpoint_files import CheckpointError
    from ..precision import PrecisionUnavailableError
    from .reference import ReferenceError
    from .trainer import TrainingError

    config = load_run_config(args.config, args.overrides)
    try:
        # Under torchrun, record() leaves this rank's traceback where the launcher reports the first
        # failing rank's error; our own line names the rank in every launcher.
        summary = record(Trainer(config).run)()
    except (CheckpointError, ConfigError, DataError, PrecisionUnavailableError, ReferenceError, TrainingError) as e:
        # Errors about the inputs or the run: the message says what to do, a traceback would bury it.
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(f"pivot-mega train: error on rank {rank}: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(f"pivot-mega train: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary.stopped_by is None:
        print(f"pivot-mega train: done after {summary.steps} steps; model in {summary.final}", file=sys.stderr)
    skipped = summary.last_metrics.get("data/skipped", 0)
    if skipped and rank0:
        reasons = {key.removeprefix("data/skipped/"): count for key, count in summary.last_metrics.items()
                   if key.startswith("data/skipped/")}
        print(f"pivot-mega train: {skipped} sample(s) skipped in all, by reason {reasons} (metrics.jsonl: "
              f"data/skipped)", file=sys.stderr)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    import json

    import torch.distributed as dist

    from ..config import ConfigError
    from ..precision import PrecisionUnavailableError
    from .bench import BenchCheckFailed, BenchError, BenchOptions, run_benchmark

    options = BenchOptions(stage=args.stage, preset=args.preset, steps=args.steps, warmup=args.warmup,
                           seq_len=args.seq_len, rows=args.rows, micro_batches=args.micro_batches,
                           response_len=args.response_len, reference=args.reference,
                           compare_naive=args.compare_naive, dpo_layout=args.dpo_layout,
                           compare_layouts=args.compare_layouts, dtype=args.dtype, attention=args.attention,
                           activation_checkpointing=args.activation_checkpointing, fp8=args.fp8, seed=args.seed,
                           overrides=list(args.overrides))
    try:
        results = run_benchmark(options)
    except (BenchError, ConfigError, FileNotFoundError, PrecisionUnavailableError) as e:
        print(f"pivot-mega bench: error: {e}", file=sys.stderr, flush=True)  # found before the work: no traceback
        return 2
    except BenchCheckFailed as e:
        print(f"pivot-mega bench: check failed: {e}", file=sys.stderr, flush=True)
        return 1
    finally:  # as train does: NCCL's communicators are released, not left to the interpreter's exit
        if dist.is_initialized():
            dist.destroy_process_group()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from ..config import ConfigError
    from .config import load_run_config
    from .plan import format_table, parse_memory, plan_layouts, recommend

    if args.gpus < 1 or args.nodes < 1 or (args.images_per_row is not None and args.images_per_row < 0):
        raise ConfigError(f"plan: --gpus and --nodes must be >= 1 and --images-per-row >= 0, got {args.gpus}, "
                          f"{args.nodes} and {args.images_per_row}")
    capacity = parse_memory(args.gpu_memory)
    config = load_run_config(args.config, args.overrides)
    estimates = plan_layouts(config, args.gpus, args.nodes, images_per_row=args.images_per_row)
    print(format_table(estimates, capacity))
    best = recommend(estimates, capacity)
    if best is None:
        print(f"recommendation: nothing fits in {capacity / 1e9:.0f} GB; shorten data.max_seq_len, or add GPUs")
    else:
        print(f"recommendation: {best.name} ({best.total / 1e9:.1f} GB of {capacity / 1e9:.0f} GB, "
              f"{(capacity - best.total) / 1e9:.1f} GB headroom): --set parallel.tensor_model_parallel_size="
              f"{best.layout.tp} parallel.pipeline_model_parallel_size={best.layout.pp} "
              f"parallel.data_parallel_sharding={best.parallel.data_parallel_sharding} "
              f"model.activation_checkpointing={str(best.activation_checkpointing).lower()}")
    if args.json:
        rows = [{"layout": dataclasses.asdict(e.layout), "data_parallel_sharding": e.parallel.data_parallel_sharding,
                 "activation_checkpointing": e.activation_checkpointing, "params": e.params, "grads": e.grads,
                 "optimizer": e.optimizer, "reference": e.reference, "activations": e.activations,
                 "working": e.working, "total": e.total, "fits": e.total <= capacity, "flops": e.flops}
                for e in estimates]
        with open(args.json, "w") as f:
            json.dump({"gpu_memory": capacity, "estimates": rows,
                       "recommended": None if best is None else estimates.index(best)}, f, indent=2)
    return 0
