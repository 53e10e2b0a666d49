"""``pivot-mega demo --quick`` end to end: data, four stages, probes, saliency, report (CPU, about a minute)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from pivot_mega import VisionLanguageModel
from pivot_mega.cli import build_parser, main
from pivot_mega.demo.pipeline import STAGES

PLOTS = ("loss.png", "dpo.png", "probe.png", "probe_steps.png", "saliency.png")
# Stage 1b of --quick (700 steps on 30 % of the digits) answered 61 % of its 80 held-out images at 2
# threads; chance is 10 % and two standard errors 6.7 points.
QUICK_STAGE1B_ANSWERS = 30.0


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(out), "--quick", "--seeds", "2", "--no-progress"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)  # the quick demo: about 2 minutes alone on 2 cores, over 5 when the box is busy
def test_demo_writes_report_plots_and_metrics(demo_out):
    report = (demo_out / "report.md").read_text()
    for name in PLOTS:
        png = demo_out / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"plots/{name}" in report
    assert "nan" not in report.lower().replace("nanmean", "")

    summary = json.loads((demo_out / "summary.json").read_text())
    for stage in STAGES:
        records = [json.loads(line) for line in (demo_out / "stages" / stage / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in records if "loss" in r]
        probes = [r for r in records if "probe/time_s" in r]
        assert rows and [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        if stage in ("sft", "dpo"):  # probed while training, at step 0, every few steps and at the end
            assert probes[0]["step"] == 0 and probes[-1]["step"] == len(rows) and len(probes) >= 3
            # the last online probe read the final weights: the offline probe of the exported model agrees
            assert not any(key.startswith("probe/projector/") for key in probes[-1])  # the demo probes the ViT
            for r in summary["probe"]:
                if r["encoder"] == stage and r["features"] == "vit":
                    assert probes[-1][f"probe/{r['features']}/{r['probe']}/top1"] == pytest.approx(r["top1"], abs=1e-6)
        else:
            assert not probes
        assert all(_finite(r["loss"]) and _finite(r["grad_norm"]) for r in rows), stage
        if stage == "dpo":
            assert all(_finite(r["rewards/accuracies"]) and _finite(r["rewards/margins"]) for r in rows)
            assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
        assert (demo_out / "configs" / f"{stage}.yaml").is_file()

    probe = summary["probe"]
    assert {(r["encoder"], r["features"], r["probe"]) for r in probe} == {
        (s, f, p) for s in STAGES for f in ("vit", "projector") for p in ("prototype", "logistic")}
    assert all(0.0 <= r["top1"] <= 100.0 for r in probe)
    answers = summary["heldout_answers"]
    assert set(answers) == set(STAGES) and all(0.0 <= a["accuracy"] <= 100.0 and a["n"] > 0 for a in answers.values())
    assert all(_finite(seconds) for seconds in summary["timings"].values())
    # The quick demo learns too: stage 1b reads the held-out digits well above chance.
    assert answers["stage1b"]["accuracy"] >= QUICK_STAGE1B_ANSWERS, answers["stage1b"]
    # Stage 2 ran with a second seed, and the report compares DPO with SFT over both.
    over = summary["over_seeds"]
    assert over["seeds"] == 2 and over["seed_values"] == [0, 1]
    assert all(len(row["sft"]) == len(row["dpo"]) == 2 and row["difference_se"] is not None for row in over["metrics"])
    for stage in ("sft_seed1", "dpo_seed1"):
        assert (demo_out / "stages" / stage / "final").is_dir() and (demo_out / "configs" / f"{stage}.yaml").is_file()
    assert "Over stage 2's 2 seed(s) (0, 1" in report
    # the report's stated numbers are the measured ones
    dpo_probe = next(r["top1"] for r in probe if (r["encoder"], r["features"], r["probe"]) == ("dpo", "vit", "logistic"))
    assert re.search(rf"\| DPO \| {dpo_probe:.1f} \|", report)


@pytest.mark.slow
@pytest.mark.timeout(600)  # the quick demo: about 2 minutes alone on 2 cores, over 5 when the box is busy
def test_demo_checkpoints_load_and_saliency_maps_exist(demo_out):
    import torch

    for stage in STAGES:
        model = VisionLanguageModel.from_checkpoint(demo_out / "stages" / stage / "final")
        size = model.config.vision.image_size
        ids = torch.full((1, model.config.num_image_tokens + 3), model.config.image_token_id)
        ids[0, -3:] = torch.tensor([1, 5, 2])
        with torch.no_grad():
            logits = model(ids, torch.zeros(1, 3, size, size))
        assert logits.shape == (1, ids.shape[1], model.config.language.vocab_size)
        assert torch.isfinite(logits).all(), stage
    for loss in ("sft", "dpo"):
        index = json.loads((demo_out / "eval" / "saliency" / loss / "index.json").read_text())
        assert index["maps"] and all((demo_out / "eval" / "saliency" / loss / m["file"]).is_file()
                                     for m in index["maps"])


def test_demo_command_is_registered_and_refuses_a_used_directory(tmp_path, capsys):
    parser, runners = build_parser()
    args = parser.parse_args(["demo", "--out", str(tmp_path), "--quick", "--steps-scale", "0.5"])
    assert "demo" in runners and args.quick and args.steps_scale == 0.5
    (tmp_path / "something").write_text("x")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_dpo_and_sft_compared_over_seeds():
    from pivot_mega.demo.pipeline import DemoOptions, compare_over_seeds

    def rows(name, logistic, prototype):
        return [{"encoder": name, "features": "vit", "probe": "logistic", "top1": logistic},
                {"encoder": name, "features": "vit", "probe": "prototype", "top1": prototype}]

    options = DemoOptions(out=Path("unused"), seed=5, seeds=3)
    names = {"sft": ["sft", "sft_seed6", "sft_seed7"], "dpo": ["dpo", "dpo_seed6", "dpo_seed7"]}
    probe = []
    for k in range(3):  # logistic: DPO 10 points up every seed; prototype: +1, -1, 0
        probe += rows(names["sft"][k], 60.0 + k, 50.0) + rows(names["dpo"][k], 70.0 + k, 50.0 + (1, -1, 0)[k])
    answers = {name: {"accuracy": 80.0} for group in names.values() for name in group}
    answers["sft_seed7"] = {"accuracy": 90.0}
    out = compare_over_seeds(probe, answers, options)
    assert out["seeds"] == 3 and out["seed_values"] == [5, 6, 7]
    by = {row["metric"]: row for row in out["metrics"]}
    logistic = by["ViT logistic probe"]
    assert logistic["difference"] == pytest.approx(10.0) and logistic["difference_se"] == pytest.approx(0.0)
    assert logistic["verdict"].startswith("DPO is better")
    prototype = by["ViT prototype probe"]
    assert prototype["difference"] == pytest.approx(0.0) and prototype["difference_se"] == pytest.approx(1 / math.sqrt(3))
    assert prototype["verdict"].startswith("the toy cannot tell")
    held = by["held-out answers"]  # differences 0, 0, -10: mean -3.3, SE 3.3
    assert held["difference"] == pytest.approx(-10 / 3) and held["verdict"].startswith("the toy cannot tell")
    assert held["difference_interval"] == pytest.approx(4.303 * 10 / 3, rel=1e-3)  # Student's t, 2 degrees of freedom
    one = compare_over_seeds(rows("sft", 60.0, 50.0) + rows("dpo", 70.0, 50.0),
                             {"sft": {"accuracy": 80.0}, "dpo": {"accuracy": 85.0}}, DemoOptions(out=Path("x")))
    assert all(row["difference_se"] is None and row["verdict"].startswith("one seed") for row in one["metrics"])
