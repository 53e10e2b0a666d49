"""Tokens and rows of PIVOT's DPO length mix in both pair layouts, packed by the training packer.

    python tools/pack_pivot_mix.py [--pairs 20000] [--max-seq-len 4096] [--seed 0]

Pairs as MMPR gives them to PIVOT: 576 image tokens, a ChatML template of ~20 tokens, a prompt of
~100 tokens and two responses of ~200, lengths log-normal. Each pair is laid out ``separate``
(``prefix + chosen | prefix + rejected``) and ``shared_prefix`` (``prefix | chosen | rejected``), and
``data.packing.pack_rows`` packs windows of 1024 pairs into rows as training does. Prints JSON: tokens,
rows, padding and the savings of the shared layout.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from pivot_mega.data.packing import pack_rows


def lognormal(rng: np.random.Generator, median: float, sigma: float, n: int, low: int, high: int) -> np.ndarray:
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), low, high).astype(int)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    prefix = 576 + 20 + lognormal(rng, 100, 0.6, args.pairs, 5, 1000)
    chosen = lognormal(rng, 200, 0.7, args.pairs, 1, 1500)
    rejected = lognormal(rng, 200, 0.7, args.pairs, 1, 1500)
    layouts = {"separate": 2 * prefix + chosen + rejected, "shared_prefix": prefix + chosen + rejected}
    out = {"pairs": args.pairs, "max_seq_len": args.max_seq_len,
           "median_prefix": float(np.median(prefix)), "median_response": float(np.median(chosen))}
    for name, lengths in layouts.items():
        fits = lengths <= args.max_seq_len
        kept = lengths[fits]
        rows = sum(len(pack_rows(kept[i:i + args.window].tolist(), args.max_seq_len))
                   for i in range(0, len(kept), args.window))
        out[name] = {"pairs_that_fit": int(fits.sum()), "tokens": int(kept.sum()), "rows": rows,
                     "tokens_per_pair": float(kept.mean()),
                     "padding_fraction": 1 - kept.sum() / (rows * args.max_seq_len)}
    s, t = out["separate"], out["shared_prefix"]
    out["token_saving"] = 1 - t["tokens_per_pair"] / s["tokens_per_pair"]
    out["row_saving"] = 1 - t["rows"] / s["rows"] * s["pairs_that_fit"] / t["pairs_that_fit"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
