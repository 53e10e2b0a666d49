"""``pivot-mega demo``: the PIVOT stages end to end on real images, on a CPU, in minutes, with no download.

scikit-learn's handwritten digits drawn in colour → LLaVA / DPO JSON → shards → a tokenizer
trained on the demo's texts → a tiny SigLIP + Qwen2 through stage 1a, 1b, then SFT and DPO from the
same stage-1b checkpoint → probes of every encoder, held-out answers, saliency maps → ``report.md``.
The parts: ``data`` (images and datasets), ``pipeline`` (the run), ``report`` (plots and text).

Nothing heavy is imported until the command runs (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> dict:
    """Adds the ``demo`` parser to ``sub``; → {"demo": run(args) -> exit code}."""
    demo = sub.add_parser(
        "demo", help="the PIVOT stages end to end on scikit-learn's digits, with a report (CPU, minutes)",
        description="Writes images, LLaVA/DPO JSON, shards and a tokenizer, trains a tiny SigLIP + Qwen2 through "
                    "stage 1a, 1b, then SFT and DPO from the same stage-1b checkpoint, probes each vision "
                    "encoder on held-out digits, draws saliency maps and writes OUT/report.md with plots.")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR",
                      help="output directory, new or empty (default runs/demo)")
    demo.add_argument("--steps-scale", type=float, default=None, metavar="X",
                      help="multiply every stage's steps by X (at least 2 each; default 1)")
    demo.add_argument("--data-scale", type=float, default=None, metavar="X",
                      help="use a fraction X of the training digits (default 1)")
    demo.add_argument("--quick", action="store_true",
                      help="a reduced run for tests: 5%% of the steps, 10%% of the data, smaller probe sets "
                           "(--steps-scale / --data-scale still apply on top)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data, the splits and every stage (default 0)")
    demo.add_argument("--seeds", type=int, default=1, metavar="N",
                      help="run stage 2 (SFT and DPO) and its evaluation with N seeds (seed, seed+1, ...) and "
                           "compare DPO with SFT over them, with error bars (default 1)")
    demo.add_argument("--threads", type=int, default=0, metavar="N",
                      help="torch threads (default: torch's choice, one per core)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars in the training stages")
    return {"demo": run}


def run(args: argparse.Namespace) -> int:
    from .pipeline import DemoOptions, run_demo

    if args.seeds < 1:
        print(f"pivot-mega demo: error: --seeds {args.seeds}: give 1 or more", file=sys.stderr)
        return 2
    changes = {"seed": args.seed, "progress": not args.no_progress, "threads": args.threads, "seeds": args.seeds}
    if args.steps_scale is not None:  # every stage's steps, stage 1b's in --quick too
        changes["steps_scale"] = args.steps_scale
        changes["stage_scales"] = {}
    if args.data_scale is not None:
        changes["data_scale"] = args.data_scale
    options = DemoOptions.quick(args.out, **changes) if args.quick else DemoOptions(out=args.out, **changes)
    try:
        run_demo(options)
    except FileExistsError as e:
        print(f"pivot-mega demo: error: {e}", file=sys.stderr)
        return 2
    return 0
