#!/usr/bin/env python3
"""Benchmark of the label log-prob head: naive full logits vs pivot_mega.kernels.linear_logprob, fwd + bwd.

    python tools/bench_logprob.py                                  # N=8192, H=1536 and 3584, V=151936
    python tools/bench_logprob.py --tokens 2048 --impls naive chunked
    python tools/bench_logprob.py --device cuda --dtype bf16       # adds triton and Liger's FLCE

One pass is ``logprob = f(hidden [N, H], weight [V, H], labels [N])`` then ``logprob.sum().backward()``
(Liger: its fused linear cross entropy with reduction="sum", the same matmuls and softmax). Every
(implementation, H) runs in a fresh process, so one case's allocations cannot hide another's. Columns:

- time: seconds of one fwd + bwd (CUDA: median of --repeats after a warm-up; CPU: one pass).
- peak extra: the most memory held at once during the pass beyond what existed before it (inputs).
  CPU: every tensor allocation and free recorded by torch.profiler (profile_memory), summed in time
  order. CUDA: torch.cuda.max_memory_allocated. It includes the gradients of hidden and weight, which
  every implementation must return (``grads`` column); ``workspace`` = peak extra - grads is what
  the implementation needs beyond its outputs. For naive that subtraction can undercount, since its
  peak may come before the weight gradient exists, so the ratios against naive are conservative.
- rss: the process's resident-set high-water mark during the pass minus its size before (CPU, Linux),
  an OS-level cross-check of the profiler's count (it also counts allocator caching).
- ratios are against naive at the same (N, H, V).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MIB = 2 ** 20


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="N, label tokens per pass (default 8192)")
    parser.add_argument("--vocab", type=int, default=151936, help="V, vocabulary size (default Qwen2.5's)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[1536, 3584],
                        help="H values (default 1536 and 3584: Qwen2.5-1.5B and 7B)")
    parser.add_argument("--impls", nargs="+", default=None,
                        help="naive chunked triton liger (default: naive chunked, + triton liger on cuda)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="input dtype (default fp32 on cpu, bf16 on cuda)")
    parser.add_argument("--token-chunk", type=int, default=None, help="linear_logprob token_chunk")
    parser.add_argument("--vocab-chunk", type=int, default=None, help="linear_logprob vocab_chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes on cuda (default 3)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case, JSON
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# One case, in its own process


def _pass_fn(impl, args):
    """A function running one fwd + bwd on (hidden, weight, labels)."""
    from pivot_mega.batch import IGNORE_INDEX
    from pivot_mega.kernels.linear_logprob import linear_logprob

    if impl == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")

        def run(hidden, weight, labels):
            loss = loss_fn(weight, hidden, labels)
            (loss[0] if isinstance(loss, tuple) else loss).backward()
        return run

    def run(hidden, weight, labels):
        logprob = linear_logprob(hidden, weight, labels, impl=impl, token_chunk=args["token_chunk"],
                                 vocab_chunk=args["vocab_chunk"])
        logprob.sum().backward()
    return run


def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_from_profiler(prof) -> int:
    """Peak of the running sum of allocation (+) and free (-) events, in time order."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def run_case(args: dict) -> dict:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args["dtype"]]
    device = torch.device(args["device"])
    n, h, v = args["tokens"], args["hidden"], args["vocab"]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n, h, generator=gen, device=device) / h ** 0.25).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, device=device) / h ** 0.25).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    run = _pass_fn(args["impl"], args)
    grads = (hidden.numel() + weight.numel()) * hidden.element_size()
    row = dict(args, grads_mib=grads / MIB)

    if device.type == "cuda":
        run(hidden, weight, labels)  # warm-up: Triton compiles, cuBLAS picks algorithms
        times = []
        for _ in range(args["repeats"]):
            hidden.grad = weight.grad = None
            torch.cuda.synchronize()
            start = time.perf_counter()
            run(hidden, weight, labels)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(hidden, weight, labels)
        torch.cuda.synchronize()
        row.update(time_s=statistics.median(times), peak_mib=(torch.cuda.max_memory_allocated() - base) / MIB)
    else:
        from torch.profiler import ProfilerActivity, profile

        # A tiny pass first, so that loading code and starting thread pools is not counted.
        tiny = [t[:16].detach().clone().requires_grad_(t.requires_grad) for t in (hidden, weight)]
        run(tiny[0], tiny[1], labels[:16] % 16)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            rss_before = _rss_bytes("VmRSS") if _reset_rss_peak() else None
            start = time.perf_counter()
            run(hidden, weight, labels)
            elapsed = time.perf_counter() - start
            rss_peak = _rss_bytes("VmHWM")
        row.update(time_s=elapsed, peak_mib=_peak_from_profiler(prof) / MIB,
                   rss_mib=None if rss_before is None else (rss_peak - rss_before) / MIB)
    row["workspace_mib"] = row["peak_mib"] - row["grads_mib"]
    return row


# ------------------------------------------------------------------------------------------------
# Driver: every case in a fresh process, one table


def _naive_fits(args: dict) -> str | None:
    """None if naive fits in the memory available now, else why not. Naive holds about three fp32
    [N, V] buffers at once (2.9 measured at N=8192, V=151936), besides inputs and gradients."""
    if args["device"] != "cpu":
        return None
    itemsize = 4 if args["dtype"] == "fp32" else 2
    need = 3 * args["tokens"] * args["vocab"] * 4 + 2 * (args["tokens"] + args["vocab"]) * args["hidden"] * itemsize
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.95 * available:
        return f"needs about {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available: use --tokens"
    return None


def _run_in_subprocess(case: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
    if proc.returncode < 0:
        return dict(case, error=f"killed by signal {-proc.returncode} (9: out of memory?)")
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        return dict(case, error=f"exit {proc.returncode}: {(errors or ['no message'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(value, base):
    return f"{value / base:.3f}" if base else "-"


def format_table(rows: list[dict]) -> str:
    head = ("| impl | N | H | V | dtype | time fwd+bwd (s) | x naive | peak extra (MiB) | x naive | grads (MiB) "
            "| workspace (MiB) | x naive | rss (MiB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    naive = {(r["tokens"], r["hidden"], r["vocab"]): r for r in rows if r["impl"] == "naive" and "error" not in r}
    for r in rows:
        key = (r["tokens"], r["hidden"], r["vocab"])
        if "error" in r:
            lines.append(f"| {r['impl']} | {key[0]} | {key[1]} | {key[2]} | {r['dtype']} | {r['error']} |||||||||")
            continue
        base = naive.get(key, {})
        rss = "-" if r.get("rss_mib") is None else f"{r['rss_mib']:.0f}"
        lines.append(
            f"| {r['impl']} | {key[0]} | {key[1]} | {key[2]} | {r['dtype']} | {r['time_s']:.2f} | "
            f"{_ratio(r['time_s'], base.get('time_s'))} | {r['peak_mib']:.0f} | "
            f"{_ratio(r['peak_mib'], base.get('peak_mib'))} | {r['grads_mib']:.0f} | {r['workspace_mib']:.0f} | "
            f"{_ratio(r['workspace_mib'], base.get('workspace_mib'))} | {rss} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.case is not None:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    impls = args.impls or (["naive", "chunked", "triton", "liger"] if args.device == "cuda" else ["naive", "chunked"])
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    rows = []
    for hidden in args.hidden:
        for impl in impls:
            case = dict(impl=impl, tokens=args.tokens, hidden=hidden, vocab=args.vocab, dtype=dtype,
                        device=args.device, token_chunk=args.token_chunk, vocab_chunk=args.vocab_chunk,
                        repeats=args.repeats)
            skip = _naive_fits(case) if impl == "naive" else None
            row = dict(case, error=f"skipped: {skip}") if skip else _run_in_subprocess(case)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
