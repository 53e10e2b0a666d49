"""``pivot-mega eval probe|segment|saliency``: argument parsing and the runs.

Nothing heavy is imported until a command runs (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import sys

from ..cli_helpers import torch_dtype

DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")


def register(sub) -> dict:
    """Adds the ``eval`` parser to ``sub``; → {"eval": run(args) -> exit code}."""
    evaluate = sub.add_parser("eval", help="vision-encoder probes and gradient saliency maps")
    verbs = evaluate.add_subparsers(dest="verb", required=True)

    probe = verbs.add_parser(
        "probe", help="prototype and logistic-regression probes of the ViT features (ImageFolder data)",
        description="Features: the ViT's selected layer, alone and/or through the projector, mean-pooled over "
                    "the image tokens and L2-normalised. Probes: class-mean prototypes (logits 100 f.P) and "
                    "logistic regression with C chosen on a held-out part of --train. Accuracies in %%.")
    probe.add_argument("--ckpt", required=True, metavar="CKPT", help="pivot_mega checkpoint directory")
    probe.add_argument("--train", required=True, metavar="DIR", help="ImageFolder: DIR/class_name/*.jpg|png")
    probe.add_argument("--val", required=True, metavar="DIR", help="ImageFolder with the same class names")
    probe.add_argument("--per-class", type=int, metavar="N",
                       help="use N random training images per class (the paper's fast probe: 50)")
    probe.add_argument("--transductive", action="store_true",
                       help="prototypes from the validation set itself (as the paper's script); default: train")
    features = probe.add_mutually_exclusive_group()
    features.add_argument("--both", dest="features", action="store_const", const="both",
                          help="ViT features and projector features (default)")
    features.add_argument("--through-projector", dest="features", action="store_const", const="projector",
                          help="only the features through the projector")
    features.add_argument("--vit-only", dest="features", action="store_const", const="vit",
                          help="only the ViT features")
    probe.set_defaults(features="both")
    probe.add_argument("--probes", nargs="+", choices=["prototype", "logistic"], default=["prototype", "logistic"])
    probe.add_argument("--C", dest="cs", default="0.01,0.03,0.1,0.316,1.0,3.16",
                       help="comma-separated C grid of the logistic probe (default: the paper's)")
    probe.add_argument("--holdout-fraction", type=float, default=0.2,
                       help="part of each training class held out to choose C (default 0.2)")
    probe.add_argument("--max-iter", type=int, default=1000, help="lbfgs iterations (default 1000)")
    _add_run_options(probe, batch_size=32)
    probe.add_argument("--out", required=True, metavar="FILE", help="results: .csv or .json")

    segment = verbs.add_parser(
        "segment", help="linear patch-segmentation probe of the ViT's patch tokens (image + mask folders)",
        description="Each patch token of the ViT's selected layer (alone and/or through the projector, "
                    "L2-normalised) is classified into the majority label of its patch's mask pixels by a "
                    "linear head (multinomial logistic regression, L-BFGS) fitted on --train. Scored on --val at "
                    "the masks' resolution: per-class recall, macro recall (the paper's figure), pixel accuracy "
                    "and mIoU, in %%. Folders: DIR/images/ + DIR/masks/ (same stems), VOC's JPEGImages/ + "
                    "SegmentationClass/ (or a VOC split list .txt), ADE20K's images/ + annotations/ (or a split "
                    "such as ADE/images/training).")
    segment.add_argument("--ckpt", required=True, metavar="CKPT", help="pivot_mega checkpoint directory")
    segment.add_argument("--train", required=True, metavar="DIR", help="DIR/images/*.jpg|png + DIR/masks/*.png")
    segment.add_argument("--val", required=True, metavar="DIR", help="the same layout, scored")
    segment.add_argument("--num-classes", type=int, required=True, metavar="K",
                         help="labels 0..K-1 (VOC: 21; ADE20K: 151 with --ignore-index 0, its 'other')")
    segment.add_argument("--features", choices=["vit", "projector", "both"], default="both",
                         help="ViT tokens, tokens through the projector, or both (default)")
    segment.add_argument("--ignore-index", type=int, default=255, metavar="N",
                         help="mask value left out of training and scoring (default 255, VOC's border)")
    segment.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations of the head (default 100)")
    segment.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty of the head (default 1e-4)")
    segment.add_argument("--patches-per-image", type=int, metavar="N",
                         help="train on at most N random labelled patches of each image (bounds memory)")
    _add_run_options(segment, batch_size=32)
    segment.add_argument("--out", required=True, metavar="FILE", help="results: .csv or .json")

    saliency = verbs.add_parser(
        "saliency", help="gradient maps of the loss over the image tokens, as PNG overlays",
        description="|d loss / d projector output|_1 per image token, border replaced, min-max, gamma 1.1, "
                    "bilinear to the image size, jet overlay (alpha 0.6). --loss dpo draws chosen | rejected "
                    "side by side; the reference log-probs are constants from --reference, or by default from "
                    "the model itself.")
    saliency.add_argument("--ckpt", required=True, metavar="CKPT", help="pivot_mega checkpoint directory")
    saliency.add_argument("--data", required=True, metavar="SHARDS", help="shards from `pivot-mega data build-shards`")
    saliency.add_argument("--tokenizer", required=True, metavar="DIR", help="Hugging Face tokenizer directory")
    saliency.add_argument("--loss", choices=["sft", "dpo"], default="sft",
                          help="sft: mean NLL of each response; dpo: the sigmoid DPO loss of each pair")
    saliency.add_argument("--reference", metavar="CKPT", help="dpo: reference model (default: --ckpt itself)")
    saliency.add_argument("--beta", type=float, default=0.1, help="dpo: beta (default 0.1)")
    saliency.add_argument("--max-images", type=int, default=16, metavar="N",
                          help="PNGs to write: images (sft) or pairs (dpo); default 16")
    saliency.add_argument("--template", choices=["qwen2", "plain"], default="qwen2")
    saliency.add_argument("--max-seq-len", type=int, metavar="N",
                          help="tokens per packed row (default 2048; 4096 for dpo, which holds both sequences)")
    _add_run_options(saliency, batch_size=None)
    saliency.add_argument("--out", required=True, metavar="DIR", help="output directory for PNGs and index.json")

    return {"eval": run_eval}


def _add_run_options(parser: argparse.ArgumentParser, batch_size: int | None) -> None:
    if batch_size is not None:
        parser.add_argument("--batch-size", type=int, default=batch_size,
                            help=f"images per batch (default {batch_size})")
    parser.add_argument("--backend", choices=["auto", "dali", "python"], default="auto",
                        help="image decoder: DALI when installed (auto), or PIL")
    parser.add_argument("--num-threads", type=int, default=2, help="image decoding threads (default 2)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of --per-class, the C split, border picks, --patches-per-image")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device_dtype(args):
    import torch

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.dtype != "auto":
        return device, torch_dtype(args.dtype)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def _load(path, device, dtype):
    from ..models import VisionLanguageModel

    model = VisionLanguageModel.from_checkpoint(path, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def _error(command: str, error: Exception) -> int:
    print(f"pivot-mega {command}: error: {error}", file=sys.stderr)
    return 2


def run_eval(args) -> int:
    from ..data.sources import DataError
    from .probe import ProbeError
    from .saliency import SaliencyError

    try:
        runs = {"probe": _run_probe, "segment": _run_segment, "saliency": _run_saliency}
        return runs[args.verb](args)
    except (ProbeError, SaliencyError, DataError) as e:
        return _error(f"eval {args.verb}", e)


def _run_probe(args) -> int:
    from .probe import FEATURE_KINDS, ProbeError, run_probes, write_results

    try:
        cs = [float(c) for c in args.cs.split(",") if c.strip()]
    except ValueError:
        raise ProbeError(f"--C {args.cs!r}: give comma-separated numbers") from None
    device, dtype = _device_dtype(args)
    model = _load(args.ckpt, device, dtype)
    kinds = FEATURE_KINDS if args.features == "both" else (args.features,)
    rows = run_probes(model, args.train, args.val, per_class=args.per_class, transductive=args.transductive,
                      kinds=kinds, probes=args.probes, Cs=cs, holdout_fraction=args.holdout_fraction,
                      batch_size=args.batch_size, backend=args.backend, num_threads=args.num_threads, seed=args.seed,
                      max_iter=args.max_iter, progress=not args.no_progress, checkpoint=str(args.ckpt))
    path = write_results(rows, args.out)
    for row in rows:
        chosen = f"  C={row['C']}" if row["C"] is not None else ""
        print(f"{row['features']:<9} {row['probe']:<9} top-1 {row['top1']:6.2f}%  top-5 {row['top5']:6.2f}%{chosen}")
    print(f"wrote {path}")
    return 0


def _run_segment(args) -> int:
    from .segment import segment_probe, write_segment_results

    device, dtype = _device_dtype(args)
    model = _load(args.ckpt, device, dtype)
    rows = segment_probe(model, args.train, args.val, args.num_classes, features=args.features,
                         ignore_index=args.ignore_index, max_iter=args.max_iter, weight_decay=args.weight_decay,
                         patches_per_image=args.patches_per_image, batch_size=args.batch_size, backend=args.backend,
                         num_threads=args.num_threads, seed=args.seed, progress=not args.no_progress,
                         checkpoint=str(args.ckpt))
    path = write_segment_results(list(rows.values()), args.out)
    for row in rows.values():
        print(f"{row['features']:<9} macro recall {row['macro_recall']:6.2f}%  pixel accuracy "
              f"{row['pixel_accuracy']:6.2f}%  mIoU {row['miou']:6.2f}%")
    row = next(iter(rows.values()))
    if row["skipped_train"] or row["skipped_val"]:
        print(f"skipped {row['skipped_train']} bad pair(s) in --train, {row['skipped_val']} in --val "
              f"(the first ones are named above)")
    print(f"wrote {path}")
    return 0


def _run_saliency(args) -> int:
    from ..training.losses import DPOConfig
    from .saliency import SaliencyError, build_loader, run_saliency

    if args.max_images <= 0:
        raise SaliencyError(f"--max-images must be > 0, got {args.max_images}")
    if args.reference and args.loss != "dpo":
        raise SaliencyError("--reference is the DPO reference model: use it with --loss dpo")
    device, dtype = _device_dtype(args)
    model = _load(args.ckpt, device, dtype)
    reference = _load(args.reference, device, dtype) if args.reference else None
    loader = build_loader(model.config, args.data, args.tokenizer, loss=args.loss, template=args.template,
                          max_seq_len=args.max_seq_len, backend=args.backend, num_threads=args.num_threads,
                          window_size=max(16, 2 * args.max_images))
    try:
        entries = run_saliency(model, loader, args.out, loss=args.loss, reference=reference,
                               dpo_config=DPOConfig(beta=args.beta), max_images=args.max_images, seed=args.seed,
                               progress=not args.no_progress)
    finally:
        loader.close()
    print(f"wrote {len(entries)} map(s) to {args.out} (index.json lists them)")
    return 0

