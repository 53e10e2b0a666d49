"""The demo's report: PNG plots (matplotlib, Agg) and ``report.md`` stating what the run measured.

    write_report(out_dir, summary)      # summary: what ``pipeline.run_demo`` gathered

Every number in the report is read from the run's own files (``stages/*/metrics.jsonl``,
``eval/*.json``); the comparisons are phrased from those numbers, with the sampling noise of the
held-out set alongside, so that the text never claims more than the numbers carry.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .data import DIGIT_NAMES

STAGES = ("stage1a", "stage1b", "sft", "dpo")
TITLES = {"stage1a": "stage 1a (projector)", "stage1b": "stage 1b (full)", "sft": "SFT", "dpo": "DPO"}
# The encoder each checkpoint holds: stage 1a trains only the projector, so its ViT is the random init.
ENCODER_LABELS = {"stage1a": "random init (1a)", "stage1b": "stage 1b", "sft": "SFT", "dpo": "DPO"}
COLOURS = {"stage1a": "#9e9e9e", "stage1b": "#4c72b0", "sft": "#dd8452", "dpo": "#55a868"}
TRAINS = {"stage1a": "projector", "stage1b": "ViT, projector, LLM", "sft": "ViT, projector, LLM",
          "dpo": "ViT, projector, LLM"}
DATA = {"stage1a": "captions (plain template)", "stage1b": "conversations (ChatML)",
        "sft": "chosen answers of the pairs", "dpo": "preference pairs"}


def _metrics(out_dir: str | Path) -> list[dict]:
    """A stage's ``metrics.jsonl`` records (a torn last line dropped, as the trainer does), steps and
    online probes alike."""
    from ..training.metrics import read_metrics

    return read_metrics(out_dir)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps (shorter at the start)."""
    if window <= 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (sums[idx] - sums[lo]) / (idx - lo)


def _tail_mean(values: list[float], fraction: float = 0.1) -> float:
    k = max(1, int(round(len(values) * fraction)))
    return float(np.mean(values[-k:]))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


# ----------------------------------------------------------------------------------------------
# plots


def plot_losses(metrics: dict[str, list[dict]], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.0))
    for ax, stage in zip(axes, STAGES):
        rows = metrics[stage]
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows], dtype=np.float64)
        ax.plot(steps, loss, color=COLOURS[stage], alpha=0.35, linewidth=0.8)
        ax.plot(steps, _smooth(loss, max(1, len(loss) // 15)), color=COLOURS[stage], linewidth=1.8)
        ax.set_title(TITLES[stage])
        ax.set_xlabel("step")
        if stage == "dpo":
            ax.axhline(math.log(2), color="black", linewidth=0.6, linestyle=":")
            ax.text(steps[-1], math.log(2), " log 2", va="bottom", ha="right", fontsize=7)
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_probe_steps(probes: dict[str, list[dict]], path: Path) -> Path | None:
    """The online probes (``eval.probe``) of SFT and DPO: ViT top-1 against the training step."""
    if not any(probes.get(stage) for stage in ("sft", "dpo")):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.0), sharey=True)
    for ax, probe in zip(axes, ("logistic", "prototype")):
        for stage in ("sft", "dpo"):
            rows = probes.get(stage) or []
            ax.plot([r["step"] for r in rows], [r[f"probe/vit/{probe}/top1"] for r in rows], marker="o",
                    markersize=3, color=COLOURS[stage], label=TITLES[stage])
        ax.set_title(f"ViT, {probe} probe, while training")
        ax.set_xlabel("step")
        ax.axhline(10.0, color="black", linewidth=0.6, linestyle=":")
    axes[0].set_ylabel("top-1 on held-out digits (%)")
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _probe_step_lines(probes: dict[str, list[dict]]) -> list[str]:
    if not any(probes.get(stage) for stage in ("sft", "dpo")):
        return []
    rows = []
    for stage in ("sft", "dpo"):
        records = probes.get(stage) or []
        if records:
            rows.append([TITLES[stage], ", ".join(f"{r['probe/vit/logistic/top1']:.1f}" for r in records),
                         ", ".join(str(r["step"]) for r in records),
                         f"{sum(r['probe/time_s'] for r in records):.1f} s"])
    return ["The ViT probed while stage 2 trained (`eval.probe` in the stage's config: the trainer probes the "
            "current encoder every few steps, apart from the step time):", "",
            "![probes while training](plots/probe_steps.png)", "",
            _table(["stage", "ViT logistic top-1 (%)", "at steps", "probe time"], rows), ""]


def plot_dpo(rows: list[dict], path: Path) -> Path:
    plt = _pyplot()
    steps = np.array([r["step"] for r in rows])
    window = max(1, len(rows) // 15)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.0))
    acc = np.array([r["rewards/accuracies"] for r in rows])
    axes[0].plot(steps, acc, color=COLOURS["dpo"], alpha=0.35, linewidth=0.8)
    axes[0].plot(steps, _smooth(acc, window), color=COLOURS["dpo"], linewidth=1.8)
    axes[0].axhline(0.5, color="black", linewidth=0.6, linestyle=":")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_title("reward accuracy (chosen > rejected)")
    margin = np.array([r["rewards/margins"] for r in rows])
    axes[1].plot(steps, margin, color=COLOURS["dpo"], alpha=0.35, linewidth=0.8)
    axes[1].plot(steps, _smooth(margin, window), color=COLOURS["dpo"], linewidth=1.8)
    axes[1].axhline(0.0, color="black", linewidth=0.6, linestyle=":")
    axes[1].set_title("reward margin (chosen - rejected)")
    for key, colour, label in (("rewards/chosen", "#2a9d8f", "chosen"), ("rewards/rejected", "#e76f51", "rejected")):
        values = np.array([r[key] for r in rows])
        axes[2].plot(steps, _smooth(values, window), color=colour, linewidth=1.6, label=label)
    axes[2].axhline(0.0, color="black", linewidth=0.6, linestyle=":")
    axes[2].set_title("rewards, beta x log(policy / reference)")
    axes[2].legend(frameon=False)
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_probes(probe_rows: list[dict], answers: dict[str, dict], path: Path) -> Path:
    plt = _pyplot()
    groups = [("vit", "logistic"), ("vit", "prototype"), ("projector", "logistic"), ("projector", "prototype")]
    score = {(r["encoder"], r["features"], r["probe"]): r["top1"] for r in probe_rows}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 3.4), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / len(STAGES)
    for k, stage in enumerate(STAGES):
        x = np.arange(len(groups)) + (k - (len(STAGES) - 1) / 2) * width
        values = [score.get((stage, f, p), np.nan) for f, p in groups]
        bars = ax.bar(x, values, width * 0.95, color=COLOURS[stage], label=ENCODER_LABELS[stage])
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(np.arange(len(groups)), [f"{'ViT' if f == 'vit' else 'ViT + projector'}\n{p}" for f, p in groups])
    ax.axhline(10.0, color="black", linewidth=0.6, linestyle=":")
    ax.set_ylabel("top-1 on held-out digits (%)")
    ax.set_ylim(0, 105)
    ax.set_title("encoder probes (chance 10 %)")
    ax.legend(frameon=False, ncol=4, loc="upper left", fontsize=8)
    stages = [s for s in STAGES if s in answers]
    values = [answers[s]["accuracy"] for s in stages]
    bars = ax2.bar(np.arange(len(stages)), values, 0.7, color=[COLOURS[s] for s in stages])
    ax2.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=7, padding=1)
    ax2.set_xticks(np.arange(len(stages)), [TITLES[s].split(" (")[0] for s in stages])
    ax2.axhline(10.0, color="black", linewidth=0.6, linestyle=":")
    ax2.set_ylim(0, 105)
    ax2.set_title('"Which digit is this?" (held out)')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_saliency(out_dir: Path, saliency: dict[str, list[dict]], pairs: dict[str, dict], image_root: Path,
                  path: Path) -> Path:
    """Rows: held-out images. Columns: the image, SFT's map of its answer's loss, DPO's map for the
    chosen and the rejected answer."""
    from PIL import Image

    plt = _pyplot()
    sft = {e["sample_id"]: e for e in saliency.get("sft", [])}
    dpo = {e["sample_id"]: e for e in saliency.get("dpo", [])}
    # Images with both maps first, then those with one (the two loaders pack samples in their own order).
    both = [i for i in dpo if i in sft]
    ids = both + [i for i in dpo if i not in sft] + [i for i in sft if i not in dpo]
    fig, axes = plt.subplots(len(ids), 4, figsize=(8, 2.1 * len(ids)), squeeze=False)
    for row, sample_id in zip(axes, ids):
        pair = pairs[sample_id]
        row[0].imshow(Image.open(image_root / pair["image"]).convert("RGB"))
        row[0].set_title(f"held out: {pair['chosen'].split()[-1].rstrip('.')}", fontsize=8)
        panels = []
        if sample_id in sft:
            panels.append((np.asarray(Image.open(out_dir / "sft" / sft[sample_id]["file"])), "SFT: right answer"))
        else:
            panels.append((None, ""))
        if sample_id in dpo:
            chosen_rejected = np.asarray(Image.open(out_dir / "dpo" / dpo[sample_id]["file"]))
            side = chosen_rejected.shape[0]
            panels.append((chosen_rejected[:, :side], f"DPO: chosen ({pair['chosen'].split()[-1].rstrip('.')})"))
            panels.append((chosen_rejected[:, -side:], f"DPO: rejected ({pair['rejected'].split()[-1].rstrip('.')})"))
        for ax, (picture, title) in zip(row[1:], panels):
            if picture is not None:
                ax.imshow(picture, interpolation="bilinear")
                ax.set_title(title, fontsize=8)
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# text


def _difference(a: float, b: float, n: int) -> tuple[float, float]:
    """a - b in points and twice its standard error, treating the two accuracies (%) as independent
    binomials over n images (roughly; they are measured on the same images)."""
    pa, pb = a / 100.0, b / 100.0
    se = math.sqrt(max(pa * (1 - pa), 1e-12) / n + max(pb * (1 - pb), 1e-12) / n) * 100.0
    return a - b, 2 * se


def _compare(name_a: str, a: float, name_b: str, b: float, n: int) -> str:
    diff, noise = _difference(a, b, n)
    if abs(diff) <= noise:
        verdict = f"within the sampling noise of {n} held-out digits (±{noise:.1f} points): no measurable difference"
    else:
        verdict = (f"{'higher' if diff > 0 else 'lower'} by more than the sampling noise of {n} held-out digits "
                   f"(±{noise:.1f} points)")
    return f"{name_a} {a:.1f}% vs {name_b} {b:.1f}%: {diff:+.1f} points, {verdict}"


def _near_chance(accuracy: float, n: int, chance: float = 10.0) -> bool:
    """Within two standard errors of ``chance`` (%) on ``n`` images."""
    return abs(accuracy - chance) <= 2 * math.sqrt(chance / 100 * (1 - chance / 100) / n) * 100


def _chance_lines(answers: dict, probe_rows: list[dict], n_val: int) -> list[str]:
    """A plain sentence when the models did not learn the digits at all, so nobody reads the
    comparisons above as more than noise."""
    trained = [s for s in ("stage1b", "sft", "dpo") if s in answers]
    answers_at_chance = all(_near_chance(answers[s]["accuracy"], answers[s]["n"]) for s in trained)
    probes_at_chance = all(_near_chance(r["top1"], n_val) for r in probe_rows if r["encoder"] in trained)
    lines = []
    if answers_at_chance and probes_at_chance:
        lines = ["**In this run no model learned to tell the digits apart**: the held-out answers and every probe "
                 "of every encoder are within two standard errors of chance (10 %). The training budget of the "
                 "demo (a ViT and an LLM from random weights, minutes on a CPU) is too small for the ViT to learn "
                 "digit shapes through the LLM, so the comparisons above are between noise. What the run does "
                 "show is every part of the system working end to end on real data: the curves above are each "
                 "stage's own training numbers. `--steps-scale` gives the stages more steps.", ""]
    elif answers_at_chance:
        lines = ["The held-out answers of the trained models are within two standard errors of chance (10 %).", ""]
    return lines


def _seed_lines(over_seeds: dict | None) -> list[str]:
    """The DPO-vs-SFT table over stage 2's seeds (``--seeds``), with standard errors."""
    if not over_seeds:
        return []
    seeds = over_seeds["seeds"]
    rows = []
    for row in over_seeds["metrics"]:
        se = "" if row["difference_se"] is None else f" ± {row['difference_interval']:.1f}"
        per_seed = ", ".join(f"{d - s:+.1f}" for s, d in zip(row["sft"], row["dpo"]))
        rows.append([row["metric"], f"{row['sft_mean']:.1f}", f"{row['dpo_mean']:.1f}",
                     f"{row['difference']:+.1f}{se}", per_seed, row["verdict"]])
    return [f"Over stage 2's {seeds} seed(s) ({', '.join(str(s) for s in over_seeds['seed_values'])}; each seed "
            "trains SFT and DPO again from the same stage-1b checkpoint; DPO - SFT is the mean of the per-seed "
            "differences ± its 95 % interval, Student's t over the seeds; the seeds share the held-out images, "
            "so the interval is the training's variation, not the image sample's):", "",
            _table(["measure", "SFT mean", "DPO mean", "DPO - SFT", "per seed", "verdict"], rows), ""]


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: str | Path, summary: dict) -> Path:
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    from ..training.metrics import probe_records, step_records

    records = {stage: _metrics(summary["stages"][stage]["out_dir"]) for stage in STAGES}
    metrics = {stage: step_records(rows) for stage, rows in records.items()}
    probes = {stage: probe_records(rows) for stage, rows in records.items()}
    probe_rows, answers = summary["probe"], summary["heldout_answers"]
    pairs = {row["id"]: row for row in json.loads((out_dir / "data" / "heldout_pairs.json").read_text())}

    plot_losses(metrics, plots / "loss.png")
    plot_dpo(metrics["dpo"], plots / "dpo.png")
    plot_probes(probe_rows, answers, plots / "probe.png")
    plot_probe_steps(probes, plots / "probe_steps.png")
    plot_saliency(out_dir / "eval" / "saliency", summary["saliency"], pairs, out_dir / "images" / "probe" / "val",
                  plots / "saliency.png")

    counts, plan, timings = summary["counts"], summary["plan"], summary["timings"]
    model, params = summary["model"], summary.get("parameters", {})
    vision, language = model["vision"], model["language"]
    score = {(r["encoder"], r["features"], r["probe"]): r for r in probe_rows}
    n_val = counts["probe_val"]
    dpo_rows = metrics["dpo"]
    tail = max(1, int(round(len(dpo_rows) * 0.1)))

    def pct(stage, features="vit", probe="logistic"):
        return score[(stage, features, probe)]["top1"]

    lines = [
        "# pivot_mega demo report",
        "",
        f"`pivot-mega demo` ran the PIVOT stages on real handwritten digits in **{timings['total']:.0f} s** "
        f"of wall time on {summary['threads']} CPU thread(s), with no download. Everything below was measured "
        "in this run; the numbers are those of a toy model trained for minutes and say nothing about the "
        "paper's models.",
        "",
        "## What ran",
        "",
        f"- **Data.** The {counts['train_digits'] + counts['probe_train'] + counts['probe_val']} 8x8 digits of "
        "scikit-learn's `load_digits` (UCI optdigits), each upscaled smoothly and drawn large, in a random "
        f"colour, at a random place on a dark background of a random tint, {vision['image_size']}x"
        f"{vision['image_size']} px, written as PNG/JPEG files. "
        f"{counts['train_digits']} digits train the MLLM: stage 1 sees them as captions ({counts['captions']}) "
        f"and conversations ({counts['conversations']}); stage 2 as {counts['pairs']} preference pairs "
        "(\"Which digit is this?\": the right digit chosen, a random wrong one rejected), drawn anew. "
        f"{counts['probe_train']} + {counts['probe_val']} other digits are never trained on: the probes' train "
        "and validation sets, and the held-out questions. Datasets are LLaVA and DPO JSON under `data/`, "
        "built into shards under `shards/` by the shard builder.",
        "- **Tokenizer.** A byte-level BPE with Qwen's special tokens trained on the demo's own texts "
        "(`tokenizer/`).",
        f"- **Model.** SigLIP {vision['hidden_size']}d x {vision['num_hidden_layers'] + 1 + vision['select_layer']} "
        f"layers (the penultimate of {vision['num_hidden_layers']} feeds the projector), {vision['image_size']} px "
        f"in {vision['patch_size']} px patches = {(vision['image_size'] // vision['patch_size']) ** 2} image tokens "
        f"-> mlp2x_gelu -> Qwen2 {language['hidden_size']}d x {language['num_hidden_layers']} layers, vocabulary "
        f"{language['vocab_size']}, output head untied; random init (each layer's PyTorch default, written to "
        "`stages/init/` for stage 1a to start from: from the trainer's N(0, 0.02) init this 3-layer LLM did not "
        "learn to read the digits in the demo's budget)"
        + (f"; {params['total'] / 1e6:.2f}M parameters (ViT {params['vision'] / 1e6:.2f}M, projector "
           f"{params['projector'] / 1e6:.2f}M, LLM {params['language'] / 1e6:.2f}M)." if params else "."),
        "- **Stages**, each a `pivot-mega train` run of its config in `configs/` "
        "(SFT and DPO both start from the stage-1b checkpoint, with the same data, steps and batch, DPO at a fifth "
        "of SFT's learning rate as in PIVOT; "
        "DPO's reference is the frozen stage-1b model, its log-probs computed once before training):",
        "",
        _table(["stage", "trains", "data", "steps x batch", "peak LR", "time", "loss: first -> last 10 % of steps"],
               [[TITLES[s], TRAINS[s], DATA[s], f"{plan[s]['steps']} x {plan[s]['batch']}",
                 f"{plan[s]['lr']:g}" + (f" (ViT {plan[s]['vision_lr']:g})" if plan[s].get("vision_lr") else ""),
                 f"{timings.get('train ' + s, float('nan')):.0f} s",
                 f"{metrics[s][0]['loss']:.3f} -> {_tail_mean([r['loss'] for r in metrics[s]]):.3f}"]
                for s in STAGES]),
        "",
        "## Training",
        "",
        "![training losses](plots/loss.png)",
        "",
        "![DPO rewards](plots/dpo.png)",
        "",
        f"DPO over its last {tail} step(s): reward accuracy "
        f"{_tail_mean([r['rewards/accuracies'] for r in dpo_rows]):.2f}, reward margin "
        f"{_tail_mean([r['rewards/margins'] for r in dpo_rows]):.3f}, loss "
        f"{_tail_mean([r['loss'] for r in dpo_rows]):.3f} (log 2 = 0.693 at the start, where the policy is the "
        "reference). These are training-batch numbers.",
        "",
        "## The vision encoders",
        "",
        "PIVOT's claim is about the encoder: DPO, which trains the ViT too, makes it see better than SFT does. "
        "The probes detach each checkpoint's ViT and classify held-out digits from its features (mean-pooled "
        "image tokens of the selected layer, L2-normalised), alone or through the projector: "
        "class-mean prototypes, and logistic regression with C chosen on part of the probe's training set. "
        f"{counts['probe_train']} training and {n_val} validation digits, each drawn "
        f"{counts.get('probe_copies', 1)} time(s) (colour, tint, place, size). Stage 1a trains only the projector, so "
        "its ViT is the random initialisation: the floor.",
        "",
        "![probes and held-out answers](plots/probe.png)",
        "",
        _table(["encoder", "ViT logistic", "ViT prototype", "ViT+proj. logistic", "ViT+proj. prototype",
                "answers (held out)"],
               [[ENCODER_LABELS[s], *[f"{pct(s, f, p):.1f}" for f, p in
                                      (("vit", "logistic"), ("vit", "prototype"), ("projector", "logistic"),
                                       ("projector", "prototype"))],
                 f"{answers[s]['accuracy']:.1f}"] for s in STAGES]),
        "",
        "Top-1 accuracy in %, chance 10 %. \"Answers\": the whole model asked \"Which digit is this?\" about "
        f"{answers['dpo']['n']} held-out images; its answer is the digit name it gives the highest probability "
        "where the reply names the digit.",
        "",
        "What the numbers say:",
        "",
        f"- ViT, logistic probe (the paper's ImageNet measure): "
        f"{_compare('DPO', pct('dpo'), 'SFT', pct('sft'), n_val)}.",
        f"- ViT, prototype probe: {_compare('DPO', pct('dpo', 'vit', 'prototype'), 'SFT', pct('sft', 'vit', 'prototype'), n_val)}.",
        f"- Stage 1b against the random encoder (ViT, logistic): "
        f"{_compare('stage 1b', pct('stage1b'), 'random init', pct('stage1a'), n_val)}.",
        f"- Held-out answers: {_compare('DPO', answers['dpo']['accuracy'], 'SFT', answers['sft']['accuracy'], answers['dpo']['n'])}; "
        f"stage 1b {answers['stage1b']['accuracy']:.1f}%.",
        "",
        *_chance_lines(answers, probe_rows, n_val),
        *_probe_step_lines(probes),
        *_seed_lines(summary.get("over_seeds")),
        "The noise bands are two standard errors of a difference of two accuracies on this many images; with "
        "a few hundred held-out images, differences of a few points are not evidence either way. The toy "
        "differs from PIVOT in every size that matters (towers trained from scratch for minutes instead of "
        "pretrained SigLIP 2 and Qwen2.5, 10 classes, a few thousand steps), so the demo shows the machinery "
        "working end to end, not the paper's result.",
        "",
        "## Saliency",
        "",
        "Gradient-magnitude saliency as in PIVOT's code: |d loss / d projector output| summed over channels, "
        f"one value per image token ({(vision['image_size'] // vision['patch_size'])}x"
        f"{(vision['image_size'] // vision['patch_size'])}), border replaced, min-max, gamma 1.1, jet overlay. "
        "SFT: the loss of the right answer; DPO: the DPO loss of the pair against the stage-1b reference, "
        "drawn at the chosen and at the rejected sequence's copy of the image. Held-out images.",
        "",
        "![saliency maps](plots/saliency.png)",
        "",
        "## Files",
        "",
        f"- `configs/*.yaml`: each stage's run config; `pivot-mega train {out_dir}/configs/dpo.yaml --set "
        "train.out_dir=runs/dpo_again` reruns one from the directory the demo ran in (its paths are relative "
        "to it).",
        "- `stages/*/metrics.jsonl` (one JSON line per step), `stages/*/final/` (portable checkpoints: "
        "`pivot_mega.VisionLanguageModel.from_checkpoint(path)`), `stages/*/checkpoints/` (resumable).",
        "- `eval/probe.csv`, `eval/heldout_answers.json` (with confusion matrices), `eval/saliency/{sft,dpo}/` "
        "(PNG, raw `.npy` maps, `index.json`), `summary.json` (everything above, machine-readable).",
        "",
        "## Timings",
        "",
        _table(["phase", "seconds"], [[name, f"{seconds:.1f}"] for name, seconds in timings.items()]),
        "",
    ]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


__all__ = ["write_report", "plot_losses", "plot_dpo", "plot_probes", "plot_saliency", "DIGIT_NAMES"]
