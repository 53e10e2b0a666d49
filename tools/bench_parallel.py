#!/usr/bin/env python3
"""Step time and memory per parallel layout, side by side, on one machine.

    python tools/bench_parallel.py                          # CPU: single, tp2, tp2-sp, pp2, fsdp2, replicate2
    python tools/bench_parallel.py --layouts tp8,tp4-pp2,fsdp8 --model examples/configs/model_pivot_so400m_qwen2.5_1.5b.yaml \
        --rows 8 --seqlen 4096 --json bench.json             # on a GPU node

Each layout runs under ``torchrun --standalone`` (as users launch training) for a few warm-up steps
and then ``--steps`` timed forward+backward+AdamW steps on random packed data. Reported per layout:
median step time, tokens/s, peak memory per rank (CUDA: max allocated; CPU: peak resident set,
which includes the interpreter and libraries) and the bytes of model state a rank holds
(parameters + gradients + AdamW moments, from the local shards: what sharding saves).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

LAYOUTS = {
    "single": (1, {}),
    "tp2": (2, {"tensor_model_parallel_size": 2}),
    "tp2-sp": (2, {"tensor_model_parallel_size": 2, "sequence_parallel": True}),
    "pp2": (2, {"pipeline_model_parallel_size": 2, "microbatches": 4}),
    "pp2-interleaved": (2, {"pipeline_model_parallel_size": 2, "virtual_pipeline_stages": 2,
                            "pipeline_schedule": "interleaved_1f1b", "microbatches": 4}),
    "fsdp2": (2, {"data_parallel_sharding": "fsdp"}),
    "replicate2": (2, {"data_parallel_sharding": "replicate"}),
    "tp2-pp2": (4, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "microbatches": 4}),
    "tp8": (8, {"tensor_model_parallel_size": 8, "sequence_parallel": True}),
    "tp4-pp2": (8, {"tensor_model_parallel_size": 4, "pipeline_model_parallel_size": 2,
                    "sequence_parallel": True, "microbatches": 8}),
    "fsdp8": (8, {"data_parallel_sharding": "fsdp"}),
    "tp2-fsdp4": (8, {"tensor_model_parallel_size": 2, "sequence_parallel": True}),
}
DEFAULT_LAYOUTS = "single,tp2,tp2-sp,pp2,pp2-interleaved,fsdp2,replicate2"

SMALL_MODEL = {
    "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
               "image_size": 64, "patch_size": 16, "select_layer": -2},
    "language": {"vocab_size": 8192, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 8,
                 "num_attention_heads": 8, "num_key_value_heads": 2, "rope_theta": 1000000.0,
                 "max_position_embeddings": 4096, "tie_word_embeddings": True},
    "image_token_id": 8191, "attention": "auto",
}


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from pivot_mega.config import ModelConfig, from_dict, load_model_config
    from pivot_mega.models import VisionLanguageModel
    from pivot_mega.batch import IGNORE_INDEX, MicroBatch, PackedSeqs, Targets
    from pivot_mega.parallel import ParallelConfig, build_mesh, lm_loss, parallelize

    torch.manual_seed(0)
    # Tiny gradients and their squares (AdamW's second moment) underflow into denormals, which x86 CPUs
    # process on a slow path (measured here: 6x slower steps); flushing them to zero changes nothing else.
    torch.set_flush_denormal(True)
    model_config = (load_model_config(args.model) if args.model else from_dict(ModelConfig, SMALL_MODEL)).validate()
    parallel = ParallelConfig(**LAYOUTS[args.worker][1])
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        parallel.mixed_precision = "bf16"
    dims = build_mesh(parallel, model_config, device_type=device_type)
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    with torch.device("meta"):
        model = VisionLanguageModel(model_config)
    pmodel = parallelize(model, dims, seed=0, device=device)
    optimizer = torch.optim.AdamW(pmodel.parameters(), lr=1e-4)

    dp, dp_rank = dims.layout.dp, dims.dp_rank
    rows = args.rows // dp
    n_micro = max(parallel.microbatches, 1)
    t = model_config.num_image_tokens
    gen = torch.Generator().manual_seed(1234 + dp_rank)
    ids = torch.randint(0, model_config.image_token_id, (rows, args.seqlen), generator=gen)
    ids[:, 1:1 + t] = model_config.image_token_id  # one image per row, then text
    half = args.seqlen // 2  # two samples per row
    labels = torch.randint(0, model_config.language.vocab_size, (rows, args.seqlen), generator=gen)
    labels[ids == model_config.image_token_id] = IGNORE_INDEX
    size = model_config.vision.image_size
    pixels = torch.randn(rows, 3, size, size, generator=gen)
    step_rows = rows // n_micro
    packed = PackedSeqs.from_lengths([[half, args.seqlen - half]] * step_rows)
    micro = [MicroBatch(ids[k * step_rows:(k + 1) * step_rows], packed,
                        Targets.from_dense(labels[k * step_rows:(k + 1) * step_rows]),
                        pixels[k * step_rows:(k + 1) * step_rows]).to(device) for k in range(n_micro)]
    total_labels = int((labels != IGNORE_INDEX).sum()) * dp

    def step():
        pmodel.forward_backward(micro, lambda h, w, mb: lm_loss(h, w, mb.targets, total_labels, dp))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    for _ in range(args.warmup):
        step()
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)

    def local_bytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    state = sum(local_bytes(p) * 2 for p in pmodel.parameters())  # parameter + gradient (fp32)
    state += sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    peak = (torch.cuda.max_memory_allocated() if device_type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    stats = torch.tensor([float(peak), float(state)], dtype=torch.float64)
    gathered = [torch.zeros_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, stats)
    if dist.get_rank() == 0:
        step_time = statistics.median(times)
        print("RESULT " + json.dumps({
            "layout": args.worker, "procs": dist.get_world_size(), "device": device_type,
            "step_time_s": step_time, "tokens_per_s": args.rows * args.seqlen / step_time,
            "peak_mem_mb_max_rank": max(g[0].item() for g in gathered) / 2**20,
            "model_state_mb_max_rank": max(g[1].item() for g in gathered) / 2**20,
        }), flush=True)
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"comma list of {sorted(LAYOUTS)}")
    parser.add_argument("--model", help="model config YAML (default: a small built-in model)")
    parser.add_argument("--rows", type=int, default=8, help="global batch rows (packed sequences)")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    results = []
    for name in args.layouts.split(","):
        if name not in LAYOUTS:
            parser.error(f"unknown layout {name!r}; known: {sorted(LAYOUTS)}")
        procs = LAYOUTS[name][0]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               str(Path(__file__).resolve()), "--worker", name, "--rows", str(args.rows), "--seqlen",
               str(args.seqlen), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.model:
            cmd += ["--model", args.model]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // procs)))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{name}: failed (exit {done.returncode})\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(lines[0].removeprefix("RESULT ")))
        print(f"done {name}", file=sys.stderr)
    base = results[0]["step_time_s"]
    print(f"{'layout':18s} {'procs':>5s} {'step s':>8s} {'vs first':>8s} {'tokens/s':>9s} "
          f"{'peak MB/rank':>12s} {'state MB/rank':>13s}")
    for r in results:
        print(f"{r['layout']:18s} {r['procs']:5d} {r['step_time_s']:8.3f} {r['step_time_s'] / base:8.2f} "
              f"{r['tokens_per_s']:9.0f} {r['peak_mem_mb_max_rank']:12.0f} {r['model_state_mb_max_rank']:13.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
