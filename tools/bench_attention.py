"""CPU attention on packed rows: the dense ``[S, S]`` block mask SDPA gets (``layers._sdpa``) against
running SDPA per segment, forward + backward, side by side in one run, and what ``auto`` picks.

    python tools/bench_attention.py [--threads 2 --heads 4 --kv-heads 2 --head-dim 32 --repeats 5]

Each case is rows x segments of a length: short rows as the demo packs them (256 tokens) and long
ones (1024-4096). ``unpacked`` is the same tokens as one segment per row (what packing saves against),
``dense`` the packed row with the block mask (backend ``sdpa``), ``per_segment`` the ``sdpa_segments``
backend (one SDPA per segment). Prints one JSON line per case: median seconds, the ratio dense /
per_segment, the largest difference of output and input gradients (fp32), the backend ``auto`` picks
(``layers.per_segment_pays``) and whether that is the faster one; then the fraction of cases it got right.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pivot_mega.batch import PackedSeqs
from pivot_mega.models.layers import attention, per_segment_pays


def timed(fn, q, k, v, repeats: int) -> tuple[float, list[torch.Tensor]]:
    times, result = [], None
    for _ in range(repeats + 1):  # the first call warms up
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        out = fn(q, k, v)
        out.square().sum().backward()
        times.append(time.perf_counter() - start)
        result = [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
    return statistics.median(times[1:]), result


CASES = ((4, 7, 36), (4, 4, 64), (4, 2, 128), (8, 12, 20), (2, 16, 32),  # (rows, segments a row, length)
         (4, 1, 1024), (2, 4, 512), (1, 2, 512), (1, 32, 64), (1, 8, 256), (1, 4, 1024), (1, 64, 64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    right = 0
    for rows, segments, length in CASES:
        seqlen = max(256, segments * length)
        lengths = [length] * segments + ([seqlen - segments * length] if seqlen > segments * length else [])
        shape = (rows, seqlen)
        q = torch.randn(*shape, args.heads, args.head_dim, requires_grad=True)
        k = torch.randn(*shape, args.kv_heads, args.head_dim, requires_grad=True)
        v = torch.randn(*shape, args.kv_heads, args.head_dim, requires_grad=True)
        packed = PackedSeqs.from_lengths([lengths] * rows)
        used = segments * length
        unpacked_q, unpacked_k, unpacked_v = (t.detach()[:, :used].reshape(rows * segments, length, *t.shape[2:])
                                              .requires_grad_() for t in (q, k, v))
        unpacked_s, _ = timed(lambda a, b, c: attention(a, b, c, causal=True, backend="sdpa"),
                              unpacked_q, unpacked_k, unpacked_v, args.repeats)
        dense_s, dense = timed(lambda a, b, c: attention(a, b, c, causal=True, packed=packed, backend="sdpa"),
                               q, k, v, args.repeats)
        segment_s, segment = timed(lambda a, b, c: attention(a, b, c, causal=True, packed=packed,
                                                             backend="sdpa_segments"), q, k, v, args.repeats)
        auto = "sdpa_segments" if per_segment_pays(packed, rows, seqlen) else "sdpa"
        faster = "sdpa_segments" if segment_s < dense_s else "sdpa"
        right += auto == faster
        print(json.dumps({"rows": rows, "row_len": seqlen, "segments_per_row": len(lengths), "segment_len": length,
                          "unpacked_s": round(unpacked_s, 4), "dense_s": round(dense_s, 4),
                          "per_segment_s": round(segment_s, 4), "dense_over_unpacked": round(dense_s / unpacked_s, 2),
                          "dense_over_per_segment": round(dense_s / segment_s, 2),
                          "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(dense, segment)),
                          "auto": auto, "auto_is_faster": auto == faster}),
              flush=True)
    print(json.dumps({"auto_picked_the_faster": f"{right}/{len(CASES)}"}))


if __name__ == "__main__":
    main()
