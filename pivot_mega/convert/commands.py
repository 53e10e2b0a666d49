"""``pivot-mega convert import-hf|export-hf`` and ``pivot-mega transplant``: argument parsing and the runs.

Two registrations: ``pivot-mega --help`` lists the commands apart. The converters (and torch) are
imported when a command runs, though ``convert/__init__.py`` imports ``hf`` with the package.
"""

from __future__ import annotations

import argparse

from ..cli_helpers import TORCH_DTYPE_NAMES, describe_model, parse_size, torch_dtype


def register(sub) -> dict:
    """Adds the ``convert`` parser to ``sub``; → {"convert": run(args) -> exit code}."""
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
    imp.add_argument("--dtype", choices=sorted(TORCH_DTYPE_NAMES), help="cast all tensors (default: keep stored dtypes)")
    imp.add_argument("--max-shard-size", type=parse_size, default="5GB",
                     help="shard size, e.g. 5GB (default)")
    imp.add_argument("--out", required=True, metavar="CKPT", help="output checkpoint directory")

    exp = verbs.add_parser("export-hf", help="pivot_mega checkpoint -> HF LLaVA dir or SigLIP encoder dir")
    exp.add_argument("--ckpt", required=True, metavar="CKPT")
    exp.add_argument("--out", required=True, metavar="DIR")
    exp.add_argument("--format", choices=["llava", "siglip"], default="llava",
                     help="llava: LlavaForConditionalGeneration; siglip: the vision encoder alone")
    exp.add_argument("--max-shard-size", type=parse_size, default="5GB")
    return {"convert": run_convert}


def register_transplant(sub) -> dict:
    """Adds the ``transplant`` parser to ``sub``; → {"transplant": run(args) -> exit code}."""
    graft = sub.add_parser(
        "transplant", help="a fresh MLLM around a trained vision encoder (or the encoder alone as SigLIP)",
        description="The vision tower of --vision-from (bit for bit, with its vision_unused.safetensors), the "
                    "language model of --llm and a projector initialised from --seed: the start of stage 1a/1b "
                    "with the ViT frozen. --format siglip writes the encoder alone as a SiglipVisionModel dir.")
    graft.add_argument("--vision-from", required=True, metavar="CKPT", help="pivot_mega checkpoint (e.g. after DPO)")
    graft.add_argument("--llm", metavar="HF_DIR|CKPT",
                       help="Qwen2 / Qwen2.5 HF directory or pivot_mega checkpoint (its language tower)")
    graft.add_argument("--format", choices=["mllm", "siglip"], default="mllm",
                       help="mllm: a pivot_mega checkpoint (default); siglip: the encoder alone, HF SiglipVisionModel")
    graft.add_argument("--seed", type=int, default=0, help="seed of the fresh projector (default 0)")
    graft.add_argument("--image-token-id", type=int,
                       help="image token id (default: from the LLM's tokenizer.json or pivot_mega config)")
    graft.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                       help="cast every tensor (needed when the encoder's and the LLM's dtypes differ)")
    graft.add_argument("--max-shard-size", type=parse_size, default="5GB")
    graft.add_argument("--out", required=True, metavar="CKPT|DIR")
    return {"transplant": run_transplant}


def run_convert(args: argparse.Namespace) -> int:
    from .hf import export_hf, import_hf

    if args.verb == "import-hf":
        config = import_hf(args.out, llava=args.llava, llava_next=args.llava_next, vision=args.vision,
                           llm=args.llm, vision_config=args.vision_config, select_layer=args.select_layer,
                           image_token_id=args.image_token_id, seed=args.seed,
                           dtype=torch_dtype(args.dtype), max_shard_bytes=args.max_shard_size)
        print(f"wrote {args.out}: {describe_model(config)}")
    else:
        out = export_hf(args.ckpt, args.out, format=args.format, max_shard_bytes=args.max_shard_size)
        print(f"wrote {out} ({args.format})")
    return 0


def run_transplant(args: argparse.Namespace) -> int:
    from .transplant import TransplantError, transplant, transplant_siglip

    if args.format == "siglip":
        if args.llm:
            raise TransplantError("--format siglip writes the encoder alone; --llm has no use there")
        out = transplant_siglip(args.vision_from, args.out, max_shard_bytes=args.max_shard_size)
        print(f"wrote {out} (SiglipVisionModel: the encoder of {args.vision_from})")
        return 0
    if not args.llm:
        raise TransplantError("--llm is required: a Qwen2 HF directory or a pivot_mega checkpoint")
    config = transplant(args.vision_from, args.llm, args.out, seed=args.seed, image_token_id=args.image_token_id,
                        dtype=torch_dtype(args.dtype), max_shard_bytes=args.max_shard_size)
    print(f"wrote {args.out}: " + describe_model(config, vision=f"the SigLIP encoder of {args.vision_from},",
                                                 projector=f"fresh mlp2x_gelu (seed {args.seed})",
                                                 language=f"the Qwen2 of {args.llm},"))
    return 0
