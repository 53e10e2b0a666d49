"""The demo run: data → tokenizer → shards → stage 1a → 1b → SFT and DPO → probes, held-out answers,
saliency → report. Every stage is a ``pivot-mega train`` run of its own config file.

    result = run_demo(DemoOptions(out=Path("runs/demo")))

Layout of ``out``::

    images/ data/ shards/ tokenizer/        the datasets, as a user would prepare them
    configs/{stage}.yaml                    run configs: `pivot-mega train configs/dpo.yaml` reruns one
    stages/{stage}/                         metrics.jsonl, checkpoints/, final/ (portable checkpoint)
    eval/                                   probe.csv, heldout_answers.json, saliency/{sft,dpo}/
    report.md, plots/*.png, summary.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import time
from pathlib import Path

import numpy as np

from . import data as demo_data

log = logging.getLogger(__name__)

STAGES = ("stage1a", "stage1b", "sft", "dpo")
STAGE_NAMES = {"stage1a": "pretrain_projector", "stage1b": "pretrain_full", "sft": "sft", "dpo": "dpo"}
STAGE_TITLES = {"stage1a": "1a projector", "stage1b": "1b full", "sft": "SFT", "dpo": "DPO"}

# The model: the tiny config's structure, a little wider, with 32 px images in 8 px patches: a 4x4 grid
# of 16 image tokens. Coarse (a saliency map keeps only its inner 2x2 once the border is replaced),
# but it is the size at which a ViT trained from scratch learns these digits in CPU minutes (measured:
# a direct classifier of this ViT reaches 88 % after 400 steps of 16 on the demo's plain backgrounds,
# 75 % in 4 px patches, which cost 4x the tokens).
# The vocabulary is the demo tokenizer's.
VOCAB_SIZE = 512
# Each training digit is drawn this many times (colour, tint, place, size) for stage 1: 4 renders
# instead of 2 took stage 1b's held-out answers from 80 % to 90 % at the same steps (seed 0).
STAGE1_COPIES = 4
# Each probe digit is drawn this many times too, for the probes' training and validation sets: with one
# picture a digit the logistic probe learned from 300 images of 96 features, and the stage-1b ViT's
# figure spread over 63.3-72.7 % in the six runs of seeds 0-2 at 1 and 2 threads; the same checkpoints
# probed on 4 pictures a digit gave 75.0-81.0 %. The held-out questions use the first picture of each
# digit, and the report's noise bands count digits, not pictures.
PROBE_COPIES = 4
MODEL = {
    "vision": {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 5, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 8, "num_channels": 3, "layer_norm_eps": 1e-6, "select_layer": -2},
    "projector": {"type": "mlp2x_gelu"},
    "language": {"vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                 "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "attention": "auto",
}


@dataclasses.dataclass
class StagePlan:
    """One stage's knobs: optimizer steps, samples (pairs) per step, peak learning rate(s)."""

    steps: int
    batch: int
    lr: float
    vision_lr: float | None = None


# Learning rates far above PIVOT's (1e-3 / 1e-5 / 5e-6 / 1e-6): its recipe starts from pretrained
# towers and runs thousands of steps; here the towers start from random weights and get a few hundred.
# Stage 1b's ViT runs at 3e-4 under an LLM at 5e-4 (measured on seed 0, stage 1b alone, 2 renders per
# digit): at 3e-3 under 1e-3 the ViT lost the digits' shapes (a probe of its tokens fell from random
# init's 74 % to 55 %; held-out answers 16 %) and learned only colours; at 1e-4 it barely moved and
# the LLM read the random features (answers 74 %, ViT probe at chance); 3e-4 under 5e-4 for 2000
# steps gave answers 81 % and a ViT probe of 72 %, against 57 % / 53 % after 1000. 2800 steps raised
# stage 1b's answers to 89.7-94.0 % in five runs over seeds and thread counts (from 83.3-90.3 %), but
# took 90-110 s more, past the demo's 8 minutes on a slow day of this 2-core machine.
# SFT and DPO get the same data, steps and batch; DPO's learning rate is a fifth of SFT's, as in PIVOT
# (5e-6 / 1e-6). At SFT's own 3e-4 DPO drove the chosen answers' log-probs down with the rejected ones
# (stage 1b's -0.74 to -4.2 per answer, reward accuracy 0.97), and the held-out answers fell below
# stage 1b's (seed 2, one thread: 83.3 % -> 77.7 %; 80.7 % at 1e-4, 81.7 % at 6e-5, from the same
# stage-1b checkpoint).
PLAN = {
    "stage1a": StagePlan(steps=30, batch=32, lr=2e-3),
    "stage1b": StagePlan(steps=2000, batch=16, lr=5e-4, vision_lr=3e-4),
    "sft": StagePlan(steps=150, batch=16, lr=3e-4),
    "dpo": StagePlan(steps=150, batch=16, lr=6e-5),
}


QUICK_STAGE1B_SCALE = 0.35  # 700 steps
QUICK_DATA_SCALE = 0.3


@dataclasses.dataclass
class DemoOptions:
    out: Path
    seed: int = 0
    # Multiplies every stage's steps (at least 2 each); ``stage_scales`` overrides it for the stages it names.
    steps_scale: float = 1.0
    stage_scales: dict = dataclasses.field(default_factory=dict)
    # Fraction of the training digits used (the probe splits are kept whole unless probe_per_class says).
    data_scale: float = 1.0
    probe_per_class: int = 30
    saliency_samples: int = 4
    progress: bool = True
    threads: int = 0  # torch threads; 0: as many as cores
    # Stage 2 (SFT and DPO from the same stage-1b checkpoint) and its evaluation run with this many
    # seeds (seed, seed + 1, ...): the DPO-vs-SFT comparison then has error bars over seeds.
    seeds: int = 1

    @classmethod
    def quick(cls, out: Path, **changes) -> "DemoOptions":
        """The reduced demo of the tests: a few steps a stage, a fraction of the data; stage 1b keeps
        enough of both to read the digits well above chance."""
        return cls(out=out, **{"steps_scale": 0.05, "stage_scales": {"stage1b": QUICK_STAGE1B_SCALE},
                               "data_scale": QUICK_DATA_SCALE, "probe_per_class": 8, "saliency_samples": 2, **changes})

    def steps(self, stage: str) -> int:
        return max(2, int(round(PLAN[stage].steps * self.stage_scales.get(stage, self.steps_scale))))


class Phases:
    """Prints each phase as it starts and ends, with its wall time; keeps the timings."""

    def __init__(self, printer=print):
        self.printer = printer
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str, what: str = ""):
        self.printer(f"[demo {self._clock()}] {name}: {what or 'started'}")
        started = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - started, 2)
        self.printer(f"[demo {self._clock()}] {name}: done in {self.timings[name]:.1f} s")

    def _clock(self) -> str:
        elapsed = int(time.perf_counter() - self.start)
        return f"{elapsed // 60:02d}:{elapsed % 60:02d}"

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)


# ----------------------------------------------------------------------------------------------
# data


@dataclasses.dataclass
class DemoData:
    tokenizer: Path
    image_token_id: int
    shards: dict[str, Path]       # captions, conversations, pairs, heldout_pairs
    probe_train: Path
    probe_val: Path
    counts: dict[str, int]


def prepare_data(options: DemoOptions) -> DemoData:
    """Images, LLaVA / DPO JSON, the tokenizer (trained on those texts) and shards, under ``out``."""
    from ..data.shard_builder import BuildOptions, build_shards
    from ..data.tokenizer import special_token_id, train_tokenizer

    out, seed = options.out, options.seed
    splits = demo_data.DigitSplits.make(seed, options.probe_per_class, options.data_scale)
    images = out / "images"
    size = MODEL["vision"]["image_size"]
    # Each training digit is drawn anew for every picture: STAGE1_COPIES times for stage 1, once for stage 2.
    stage1 = [im for copy in range(STAGE1_COPIES)
              for im in demo_data.render_digits(splits.train, images / "stage1", image_size=size,
                                                seed=seed + 10 + copy, prefix=f"s1{'abcdefgh'[copy]}_")]
    stage2 = demo_data.render_digits(splits.train, images / "stage2", image_size=size, seed=seed + 2, prefix="s2_",
                                     image_format="jpg")
    probe_root = out / "images" / "probe"
    for copy in range(PROBE_COPIES):
        prefix = "d" if copy == 0 else f"d{copy}_"
        demo_data.render_digits(splits.probe_train, probe_root / "train", image_size=size, seed=seed + 3 + 1000 * copy,
                                prefix=prefix, subdirs_by_digit=True)
        val = demo_data.render_digits(splits.probe_val, probe_root / "val", image_size=size,
                                      seed=seed + 4 + 1000 * copy, prefix=prefix, subdirs_by_digit=True)
        if copy == 0:
            heldout = val  # the held-out questions: one picture of each digit
    rng = np.random.default_rng(seed)
    rows = {"captions": demo_data.caption_rows(stage1, rng),
            "conversations": demo_data.conversation_rows(stage1, rng),
            "pairs": demo_data.preference_rows(stage2, rng),
            "heldout_pairs": demo_data.preference_rows(heldout, rng)}
    roots = {"captions": images / "stage1", "conversations": images / "stage1", "pairs": images / "stage2",
             "heldout_pairs": probe_root / "val"}
    kinds = {"heldout_pairs": "dpo", "pairs": "dpo"}
    from ..data.config import DataConfig
    tokenizer = train_tokenizer(out / "tokenizer", demo_data.corpus(rows, DataConfig.system_prompt),
                                vocab_size=VOCAB_SIZE)
    shards = {}
    for name, dataset in rows.items():
        path = demo_data.write_json(out / "data" / f"{name}.json", dataset)
        shards[name] = out / "shards" / name
        manifest = build_shards(kinds.get(name, "llava"), path, shards[name], roots[name],
                                BuildOptions(samples_per_shard=256, shard_size_mb=None, workers=1, progress=False,
                                             strict=True))
        log.debug("%s: %s", name, manifest.get("counts"))
    counts = {name: len(dataset) for name, dataset in rows.items()}
    counts.update(train_digits=len(splits.train), probe_train=len(splits.probe_train),
                  probe_val=len(splits.probe_val), probe_copies=PROBE_COPIES)
    return DemoData(tokenizer, special_token_id(tokenizer, "<|image_pad|>"), shards, probe_root / "train",
                    probe_root / "val", counts)


# ----------------------------------------------------------------------------------------------
# training


def run_name(stage: str, repeat: int, options: DemoOptions) -> str:
    """``stage``, or for stage 2's repeats ``{stage}_seed{seed}``: its folder and config name."""
    return stage if repeat == 0 else f"{stage}_seed{options.seed + repeat}"


def stage_config(stage: str, data: DemoData, options: DemoOptions, init_from: str, repeat: int = 0) -> dict:
    """The run config of one stage, as a user would write it (paths relative to the current directory);
    ``repeat`` k > 0: stage 2 again with seed ``options.seed + k`` (data order and sampling)."""
    plan, out = PLAN[stage], options.out
    seed = options.seed + repeat
    dpo = stage == "dpo"
    steps = options.steps(stage)
    config: dict = {"stage": STAGE_NAMES[stage], "init_from": init_from}
    config["data"] = {
        "shards": str(data.shards["captions" if stage == "stage1a" else "conversations" if stage == "stage1b"
                                  else "pairs"]),
        "tokenizer": str(data.tokenizer), "mode": "dpo" if dpo else "lm",
        "template": "plain" if stage == "stage1a" else "qwen2",
        # Rows of 256 tokens: one pair (two sequences of ~100 tokens) or two samples; several rows a
        # micro-batch, since wide matmuls are what a CPU runs fastest.
        "max_seq_len": 256, "micro_batch_rows": 8 if dpo else 4, "window_size": 256,
        # The python (PIL) decoder: identical pixels on every machine (DALI, when installed, agrees
        # within 1/255 and is the faster choice for real runs).
        "backend": "python", "num_threads": 1, "prefetch": 2, "seed": seed}
    config["optim"] = {"lr": plan.lr, "warmup_ratio": 0.05, "weight_decay": 0.0}
    if plan.vision_lr is not None:
        config["optim"]["vision_lr"] = plan.vision_lr
    if stage in ("sft", "dpo") and repeat == 0:
        # The encoder probed while stage 2 trains, on the probe's digits: its ViT's accuracy step by step
        # (at 0, a third, two thirds and the end; each probe costs about 3 s).
        config["eval"] = {"probe": {"train": str(data.probe_train), "val": str(data.probe_val),
                                    "every": max(2, steps // 3), "features": ["vit"]}}
    if dpo:
        # PIVOT's DPO: sigmoid loss, beta 0.1, the frozen stage-1 model as reference (its log-probs
        # computed once before training).
        config["dpo"] = {"loss_type": "sigmoid", "beta": 0.1, "reference": "precomputed",
                         "precompute_reference": True}
    config["train"] = {"out_dir": str(out / "stages" / run_name(stage, repeat, options)), "global_batch_size": plan.batch,
                       "max_steps": steps, "epochs": 100, "save_every": 0, "keep_last": 1,
                       "log_every": max(1, steps // 4), "seed": seed, "progress": options.progress,
                       "tensorboard": False}
    return config


def write_initial_model(data: DemoData, options: DemoOptions) -> str:
    """The random towers stage 1a starts from, as a portable checkpoint (``stages/init``): each layer's
    PyTorch default initialisation, seeded. Not the trainer's own init (weights ~ N(0, 0.02)), from
    which the demo's 3-layer LLM did not learn to read the digits in its budget (measured: the same
    model trained directly on "which digit" stays at chance for 400 steps from the trainer's init and
    reaches 23-50 % from the default one, the difference being the LLM's init). The output head is
    untied from the input embeddings (``MODEL``), so that the default N(0, 1) embeddings do not make
    the first logits huge."""
    import torch

    from ..config import ModelConfig, from_dict
    from ..models.checkpoint_io import save_model
    from ..models.mllm import VisionLanguageModel

    torch.manual_seed(options.seed)
    model = VisionLanguageModel(from_dict(ModelConfig, {**MODEL, "image_token_id": data.image_token_id}).validate())
    return str(save_model(model, options.out / "stages" / "init"))


def train_stage(stage: str, data: DemoData, options: DemoOptions, init_from: str, repeat: int = 0) -> dict:
    """Writes ``configs/{stage}.yaml`` and runs it with the trainer; → {final, steps, out_dir, config}."""
    import yaml

    from ..training.config import load_run_config
    from ..training.trainer import Trainer

    config = stage_config(stage, data, options, init_from, repeat)
    path = options.out / "configs" / f"{run_name(stage, repeat, options)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Demo stage {STAGE_TITLES[stage]}, written by `pivot-mega demo`. Rerun it with\n"
              f"#   pivot-mega train {path} --set train.out_dir=runs/demo_again/{stage}\n")
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    summary = Trainer(load_run_config(path)).run()
    if summary.final is None:
        raise RuntimeError(f"stage {stage} stopped by {summary.stopped_by} before its final export")
    return {"final": summary.final, "steps": summary.steps, "out_dir": summary.out_dir, "config": str(path)}


def count_parameters(checkpoint: str) -> dict[str, int]:
    """Parameters of a checkpoint by tower, and in all (a tied embedding counted once)."""
    from ..models.mllm import VisionLanguageModel

    model = VisionLanguageModel.from_checkpoint(checkpoint)
    counts = {tower: sum(p.numel() for p in getattr(model, tower).parameters())
              for tower in ("vision", "projector", "language")}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def read_metrics(out_dir: str | os.PathLike) -> list[dict]:
    """A stage's ``metrics.jsonl`` step records (a torn last line dropped, as the trainer does; the online
    probes' records left out)."""
    from ..training.metrics import read_metrics, step_records

    return step_records(read_metrics(out_dir))


# ----------------------------------------------------------------------------------------------
# evaluation


def probe_encoders(checkpoints: dict[str, str], data: DemoData, options: DemoOptions) -> list[dict]:
    """PIVOT's probes (prototype, logistic) of each encoder's features, ViT and through the projector."""
    import torch

    from ..eval.probe import run_probes, write_results
    from ..models.mllm import VisionLanguageModel

    rows = []
    for name, path in checkpoints.items():
        model = VisionLanguageModel.from_checkpoint(path).eval()
        with torch.no_grad():
            rows += [{**row, "encoder": name} for row in run_probes(
                model, data.probe_train, data.probe_val, backend="python", progress=False, seed=options.seed,
                checkpoint=str(path))]
    write_results([{k: v for k, v in row.items() if k != "encoder"} for row in rows], options.out / "eval" / "probe.csv")
    (options.out / "eval" / "probe.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def digit_token_ids(tokenizer: str | os.PathLike) -> tuple[int, list[int]]:
    """The ten replies share a prefix and differ in one token, the digit's name:
    → (tokens of the shared prefix, the ten digit tokens). Anything else is an error."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    replies = [tok.encode(demo_data.answer(d), add_special_tokens=False) for d in range(10)]
    prefix = 0
    while all(len(r) > prefix and r[prefix] == replies[0][prefix] for r in replies):
        prefix += 1
    digits = [r[prefix] for r in replies]
    if len(set(digits)) != 10 or any(r[:prefix] + r[prefix + 1:] != replies[0][:prefix] + replies[0][prefix + 1:]
                                     for r in replies):
        raise ValueError(f"{tokenizer}: the ten replies {[demo_data.answer(d) for d in range(10)]} do not differ "
                         f"in exactly one token each")
    return prefix, digits


def heldout_answers(checkpoints: dict[str, str], data: DemoData, options: DemoOptions) -> dict[str, dict]:
    """"Which digit is this?" on held-out images: the model's answer is the digit name it gives the
    highest probability where the reply names the digit ("The digit is ___"), i.e. what greedy
    decoding says when kept to the ten names. → {stage: {accuracy (%), n, correct, confusion}}."""
    import torch

    from ..eval.saliency import build_loader
    from ..models.mllm import VisionLanguageModel

    prefix, digit_tokens = digit_token_ids(data.tokenizer)
    digit_tokens_t = torch.tensor(digit_tokens)
    results = {}
    for name, path in checkpoints.items():
        model = VisionLanguageModel.from_checkpoint(path).eval()
        loader = build_loader(model.config, data.shards["heldout_pairs"], data.tokenizer, loss="sft",
                              max_seq_len=256, backend="python", window_size=256)
        confusion = np.zeros((10, 10), dtype=np.int64)  # [true, answered]
        try:
            with torch.no_grad():
                for batch in loader:
                    if batch.epoch > 0:
                        break
                    hidden = model(batch.input_ids, batch.images, image_index=batch.image_index,
                                   packed=batch.packed, return_hidden=True).flatten(0, 1)   # [R*S, H]
                    targets = batch.targets
                    for sequence in range(targets.num_sequences):
                        mine = targets.sequence == sequence
                        # The answer's digit token, and the position that predicts it.
                        position = int(targets.positions[mine][prefix])
                        true = digit_tokens.index(int(targets.tokens[mine][prefix]))
                        logits = hidden[position] @ model.language.head_weight[digit_tokens_t].T
                        confusion[true, int(torch.argmax(logits))] += 1
        finally:
            loader.close()
        n = int(confusion.sum())
        correct = int(np.trace(confusion))
        results[name] = {"accuracy": 100.0 * correct / max(n, 1), "n": n, "correct": correct,
                         "confusion": confusion.tolist()}
    (options.out / "eval" / "heldout_answers.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def saliency_maps(checkpoints: dict[str, str], data: DemoData, options: DemoOptions) -> dict[str, list[dict]]:
    """Gradient saliency on held-out pairs: the SFT model's NLL of the right answer, the DPO model's
    DPO loss against its reference (the stage-1b model), chosen | rejected side by side."""
    from ..eval.saliency import build_loader, run_saliency
    from ..models.mllm import VisionLanguageModel
    from ..training.losses import DPOConfig

    reference = VisionLanguageModel.from_checkpoint(checkpoints["stage1b"]).eval()
    out = {}
    for name, loss in (("sft", "sft"), ("dpo", "dpo")):
        model = VisionLanguageModel.from_checkpoint(checkpoints[name]).eval()
        loader = build_loader(model.config, data.shards["heldout_pairs"], data.tokenizer, loss=loss,
                              max_seq_len=256, backend="python", window_size=64)
        try:
            out[name] = run_saliency(model, loader, options.out / "eval" / "saliency" / name, loss=loss,
                                     reference=reference if loss == "dpo" else None,
                                     dpo_config=DPOConfig(beta=0.1) if loss == "dpo" else None,
                                     max_images=options.saliency_samples, seed=options.seed, progress=False)
        finally:
            loader.close()
    return out


def compare_over_seeds(probe_rows: list[dict], answers: dict[str, dict], options: DemoOptions) -> dict:
    """DPO against SFT over stage 2's seeds, for the held-out answers and the ViT probes: each one's mean,
    the mean of the per-seed differences DPO - SFT, its standard error and its 95 % interval (Student's t
    with seeds - 1 degrees of freedom: 12.7 standard errors for 2 seeds, 4.3 for 3; None with one seed),
    and a verdict: one is better when the interval excludes 0, else the toy cannot tell. The seeds share
    the held-out images, so the interval holds the training's variation, not that of the image sample."""
    from scipy.stats import t as student_t

    names = {stage: [run_name(stage, k, options) for k in range(options.seeds)] for stage in ("sft", "dpo")}
    score = {(r["encoder"], r["features"], r["probe"]): r["top1"] for r in probe_rows}
    measures = {"held-out answers": lambda name: answers[name]["accuracy"],
                "ViT logistic probe": lambda name: score[(name, "vit", "logistic")],
                "ViT prototype probe": lambda name: score[(name, "vit", "prototype")]}
    rows = []
    for metric, value in measures.items():
        sft, dpo = ([value(n) for n in names[stage]] for stage in ("sft", "dpo"))
        differences = np.array(dpo) - np.array(sft)
        n = len(differences)
        se = float(differences.std(ddof=1) / math.sqrt(n)) if n > 1 else None
        interval = float(student_t.ppf(0.975, n - 1) * se) if n > 1 else None
        mean = float(differences.mean())
        if se is None:
            verdict = "one seed: no error bar (--seeds N repeats stage 2)"
        elif abs(mean) > interval:
            verdict = f"{'DPO' if mean > 0 else 'SFT'} is better (its 95 % interval excludes 0)"
        else:
            verdict = "the toy cannot tell them apart (the 95 % interval of the difference holds 0)"
        rows.append({"metric": metric, "sft": sft, "dpo": dpo, "sft_mean": float(np.mean(sft)),
                     "dpo_mean": float(np.mean(dpo)), "difference": mean, "difference_se": se,
                     "difference_interval": interval, "verdict": verdict})
    return {"seeds": options.seeds, "seed_values": [options.seed + k for k in range(options.seeds)], "metrics": rows}


# ----------------------------------------------------------------------------------------------
# the whole run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(options: DemoOptions, printer=print) -> dict:
    """Runs everything into ``options.out``; → the summary also written to ``summary.json``."""
    import torch

    from .report import write_report

    options.out = Path(options.out)
    if options.out.exists() and any(options.out.iterdir()):
        raise FileExistsError(f"{options.out}: output directory is not empty; give a new --out or remove it")
    options.out.mkdir(parents=True, exist_ok=True)
    # Set even when it is torch's own default: an explicit count also fixes how the math libraries split
    # their work, so `make demo` (0: torch's choice, one per core) gives what --threads <cores> gives
    # (measured: without this call, stage 1a's losses parted from --threads 2's at step 9 on 2 cores).
    torch.set_num_threads(options.threads or torch.get_num_threads())
    # One process, no launcher: a free rendezvous port, so that a second run on the machine does not collide.
    if "RANK" not in os.environ and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    phases = Phases(printer)

    with phases.phase("data", "digits in colour -> PNG/JPEG, LLaVA and DPO JSON, tokenizer, shards"):
        data = prepare_data(options)
    printer(f"        {data.counts['train_digits']} training digits ({data.counts['pairs']} pairs), probe "
            f"{data.counts['probe_train']} train / {data.counts['probe_val']} val, tokenizer {data.tokenizer}")

    stages: dict[str, dict] = {}
    init = {"stage1a": "init", "stage1b": "stage1a", "sft": "stage1b", "dpo": "stage1b"}
    stages["init"] = {"final": write_initial_model(data, options)}
    for stage in STAGES:
        start_from = stages[init[stage]]["final"]
        what = (f"{STAGE_NAMES[stage]}, {options.steps(stage)} steps x {PLAN[stage].batch} "
                f"{'pairs' if stage == 'dpo' else 'samples'}" + (f", from {start_from}" if start_from else ""))
        with phases.phase(f"train {stage}", what):
            stages[stage] = train_stage(stage, data, options, start_from)
        last = read_metrics(stages[stage]["out_dir"])[-1]
        extra = (f", reward accuracy {last['rewards/accuracies']:.2f}, margin {last['rewards/margins']:.3f}"
                 if stage == "dpo" else "")
        printer(f"        last step: loss {last['loss']:.4f}{extra}")

    checkpoints = {stage: stages[stage]["final"] for stage in STAGES}
    for repeat in range(1, options.seeds):
        for stage in ("sft", "dpo"):
            name = run_name(stage, repeat, options)
            with phases.phase(f"train {name}", f"{STAGE_NAMES[stage]} again with seed {options.seed + repeat}"):
                stages[name] = train_stage(stage, data, options, stages["stage1b"]["final"], repeat)
            checkpoints[name] = stages[name]["final"]
    parameters = count_parameters(checkpoints["stage1a"])
    with phases.phase("probe", "prototype + logistic probes of each encoder on held-out digits"):
        probe_rows = probe_encoders(checkpoints, data, options)
    for stage in checkpoints:
        best = {(r["features"], r["probe"]): r["top1"] for r in probe_rows if r["encoder"] == stage}
        printer(f"        {stage:8s} " + "  ".join(f"{f}/{p} {v:.1f}%" for (f, p), v in best.items()))
    with phases.phase("answers", "'Which digit is this?' on held-out images, ten replies scored"):
        answers = heldout_answers(checkpoints, data, options)
    printer("        " + "  ".join(f"{k} {v['accuracy']:.1f}%" for k, v in answers.items()))
    over_seeds = compare_over_seeds(probe_rows, answers, options)
    for row in over_seeds["metrics"]:
        printer(f"        over {over_seeds['seeds']} seed(s), {row['metric']}: SFT {row['sft_mean']:.1f} DPO "
                f"{row['dpo_mean']:.1f}, DPO - SFT {row['difference']:+.1f} ± {row['difference_interval'] or 0:.1f} (95 %): "
                f"{row['verdict']}")
    probe_rows = [r for r in probe_rows if r["encoder"] in STAGES]
    answers = {stage: answers[stage] for stage in STAGES}
    with phases.phase("saliency", "gradient maps of SFT samples and DPO pairs"):
        saliency = saliency_maps(checkpoints, data, options)

    summary = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(options).items()},
        "model": {**MODEL, "image_token_id": data.image_token_id}, "counts": data.counts,
        "plan": {stage: {**dataclasses.asdict(PLAN[stage]), "steps": options.steps(stage)} for stage in STAGES},
        "parameters": parameters, "stages": stages, "probe": probe_rows, "heldout_answers": answers, "saliency": saliency,
        "over_seeds": over_seeds,
        "threads": torch.get_num_threads(),
    }
    with phases.phase("report", "plots and report.md"):
        summary["timings"] = dict(phases.timings)
        summary["timings"]["total"] = phases.total
        report = write_report(options.out, summary)
    summary["timings"] = {**phases.timings, "total": phases.total}
    (options.out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    printer(f"[demo] done in {phases.total:.0f} s: {report}")
    return summary


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
