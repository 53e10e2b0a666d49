"""``pivot-mega`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def _size(text: str) -> int:
    """'5GB', '200MB', '64KB' or a byte count → bytes."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    text = text.strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def describe_model(config, *, vision: str = "SigLIP", projector: str = "mlp2x_gelu", language: str = "Qwen2") -> str:
    """One line on a model config's towers, for the commands that write checkpoints."""
    v, lang = config.vision, config.language
    return (f"{vision} {v.hidden_size}d x {v.num_layers_built} layers (select_layer {v.select_layer}, "
            f"{config.num_image_tokens} tokens/image) -> {projector} -> {language} {lang.hidden_size}d x "
            f"{lang.num_hidden_layers} layers, vocab {lang.vocab_size}, image token {config.image_token_id}")


def _add_convert(sub) -> None:
    convert = sub.add_parser("convert", help="HF checkpoints in and out")
    verbs = convert.add_subparsers(dest="verb", required=True)

    imp = verbs.add_parser(
        "import-hf", help="HF LLaVA / LLaVA-NeXT / SigLIP + Qwen2 directories -> pivot_mega checkpoint",
        description="Give one source: --llava DIR, --llava-next DIR, or --vision DIR --llm DIR.")
    imp.add_argument("--llava", metavar="DIR", help="HF LlavaForConditionalGeneration dir (SigLIP + Qwen2)")
    imp.add_argument("--llava-next", metavar="DIR",
                     help="LLaVA-NeXT / PIVOT reference checkpoint (model.vision_tower.vision_tower.* ...)")
    imp.add_argument("--vision", metavar="DIR", help="SigLIP dir (SiglipModel or SiglipVisionModel)")
    imp.add_argument("--llm", metavar="DIR", help="Qwen2 / Qwen2.5 dir (Qwen2ForCausalLM)")
    imp.add_argument("--vision-config", metavar="PATH",
                     help="with --llava-next: the tower's SigLIP config (HF dir, config.json or YAML preset)")
    imp.add_argument("--select-layer", type=int, default=-2,
                     help="with --vision: hidden state fed to the projector (default -2, penultimate)")
    imp.add_argument("--image-token-id", type=int,
                     help="token id of image positions (default: <image> or <|image_pad|> from tokenizer.json)")
    imp.add_argument("--seed", type=int, default=0, help="seed of the fresh projector (with --vision/--llm)")
    imp.add_argument("--dtype", choices=sorted(DTYPES), help="cast all tensors (default: keep stored dtypes)")
    imp.add_argument("--max-shard-size", type=_size, default="5GB", help="shard size, e.g. 5GB (default)")
    imp.add_argument("--out", required=True, metavar="CKPT", help="output checkpoint directory")

    exp = verbs.add_parser("export-hf", help="pivot_mega checkpoint -> HF LLaVA dir or SigLIP encoder dir")
    exp.add_argument("--ckpt", required=True, metavar="CKPT")
    exp.add_argument("--out", required=True, metavar="DIR")
    exp.add_argument("--format", choices=["llava", "siglip"], default="llava",
                     help="llava: LlavaForConditionalGeneration; siglip: the vision encoder alone")
    exp.add_argument("--max-shard-size", type=_size, default="5GB")


def _run_convert(args) -> None:
    from .convert.hf import export_hf, import_hf

    if args.verb == "import-hf":
        config = import_hf(args.out, llava=args.llava, llava_next=args.llava_next, vision=args.vision,
                           llm=args.llm, vision_config=args.vision_config, select_layer=args.select_layer,
                           image_token_id=args.image_token_id, seed=args.seed,
                           dtype=DTYPES.get(args.dtype), max_shard_bytes=args.max_shard_size)
        print(f"wrote {args.out}: {describe_model(config)}")
    else:
        out = export_hf(args.ckpt, args.out, format=args.format, max_shard_bytes=args.max_shard_size)
        print(f"wrote {out} ({args.format})")


def _add_data(sub) -> None:
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


def _run_data(args) -> int:
    from .data.shards import BuildOptions, build_shards, summarize
    from .data.sources import DataError

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


# Commands defined next to the code they run. Each module's ``register(sub)`` adds its subparsers and
# returns {command name: run(args) -> exit code}; it imports nothing heavy until a command runs.
COMMAND_MODULES = (
    "pivot_mega.training.commands",
    "pivot_mega.eval.commands",
    "pivot_mega.demo",
)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="pivot-mega", description="PIVOT MLLM training system")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_data(sub)
    runners = {"convert": _run_convert, "data": _run_data}
    for name in COMMAND_MODULES:
        runners.update(importlib.import_module(name).register(sub))
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .models.checkpoint_io import CheckpointError

    parser, runners = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return runners[args.command](args) or 0
    except (CheckpointError, ConfigError) as e:
        print(f"pivot-mega {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
