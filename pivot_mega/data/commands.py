"""``pivot-mega data build-shards``: argument parsing and the run.

Nothing but argparse is imported until the command runs (building shards does not import torch).
"""

from __future__ import annotations

import argparse
import sys


def register(sub) -> dict:
    """Adds the ``data`` parser to ``sub``; → {"data": run(args) -> exit code}."""
    data = sub.add_parser("data", help="datasets -> WebDataset shards")
    verbs = data.add_subparsers(dest="verb", required=True)
    build = verbs.add_parser(
        "build-shards", help="LLaVA / DPO / MMPR / mixture -> tar shards + DALI indexes + manifest.json",
        description="Bad samples (missing or corrupt images, malformed rows, non-UTF-8 text, empty or identical "
                    "responses, <image> counts that do not match the images) are skipped and listed with their "
                    "reason in manifest.json; --strict makes the first one an error.")
    build.add_argument("--kind", required=True, choices=["llava", "dpo", "mmpr", "mixture"],
                       help="llava: [{id, image, conversations}]; dpo: [{id, image, prompt, chosen, rejected}]; "
                            "mmpr: meta.json naming JSONL annotations; mixture: YAML of {json_path, sampling_strategy}")
    build.add_argument("--input", required=True, metavar="FILE", help="JSON/JSONL file, MMPR meta.json or mixture YAML")
    build.add_argument("--image-root", metavar="DIR",
                       help="directory image paths are relative to (default: the input's directory)")
    build.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    build.add_argument("--samples-per-shard", type=int, metavar="N", help="close a shard after N samples")
    build.add_argument("--shard-size-mb", type=float, metavar="MB",
                       help="close a shard before it passes MB megabytes (default 512 unless --samples-per-shard)")
    build.add_argument("--max-samples", type=int, metavar="N",
                       help="keep the first N samples that pass every check, in a shuffled order (--seed)")
    build.add_argument("--seed", type=int, default=0, help="seed of --max-samples and random: strategies (default 0)")
    build.add_argument("--tokenizer", metavar="DIR", help="HF tokenizer for --max-prompt-chosen-tokens")
    build.add_argument("--max-prompt-chosen-tokens", type=int, metavar="N",
                       help="skip pairs whose prompt + chosen exceed N tokens (PIVOT's MMPR rule: 1500)")
    build.add_argument("--workers", type=int, help="processes verifying images (default: one per CPU core)")
    build.add_argument("--strict", action="store_true", help="stop at the first bad sample")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    return {"data": run}


def run(args: argparse.Namespace) -> int:
    from .shard_builder import BuildOptions, build_shards, summarize
    from .sources import DataError

    size_mb = args.shard_size_mb if args.shard_size_mb is not None or args.samples_per_shard else 512.0
    options = BuildOptions(samples_per_shard=args.samples_per_shard, shard_size_mb=size_mb, strict=args.strict,
                           max_samples=args.max_samples, seed=args.seed, tokenizer=args.tokenizer,
                           max_prompt_chosen_tokens=args.max_prompt_chosen_tokens, progress=not args.no_progress)
    if args.workers is not None:
        options.workers = args.workers
    try:
        manifest = build_shards(args.kind, args.input, args.out, args.image_root, options)
    except DataError as e:
        print(f"pivot-mega data: error: {e}", file=sys.stderr)
        return 2
    print(summarize(manifest, args.out))
    return 0
