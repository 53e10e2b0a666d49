"""A run that produced garbage never exits 0: no export of non-finite weights, no success after skipped steps."""

from __future__ import annotations

import pytest
import torch

from pivot_mega.cli import main as cli_main
from pivot_mega.models import VisionLanguageModel
from pivot_mega.training import export_model
from pivot_mega.training.checkpoint.portable import NonFiniteWeightsError
from pivot_mega.training.steps import StepRunner
from pivot_mega.training.trainer import TrainingError
from tests.parallel.test_equivalence import tiny_config
from tests.training.runs import write_tiny_run
from tests.training import test_trainer as trainer_tests  # a module: its tests are not collected here again


def test_export_refuses_a_model_with_a_nan_and_writes_nothing(tmp_path, seed):
    model = VisionLanguageModel(tiny_config()).init_weights(seed)
    names = [name for name, _ in model.named_parameters()]
    planted = names[len(names) // 2]
    with torch.no_grad():
        model.get_parameter(planted).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=rf"1 tensor\(s\) hold NaN or Inf, the first {planted}"):
        export_model(model, tmp_path / "final")
    assert not (tmp_path / "final").exists()


def _poison_last_step(monkeypatch, last_step: int, *, loss: bool, weights: bool) -> None:
    """Makes step ``last_step``'s loss and gradients non-finite, or a weight NaN (loss and gradients finite)."""
    run = StepRunner.run
    calls = {"n": 0}

    def poisoned(self, batches):
        result = run(self, batches)
        calls["n"] += 1
        if calls["n"] == last_step:
            with torch.no_grad():
                for param in self.pmodel.parameters():
                    if loss and param.grad is not None:
                        param.grad.fill_(float("nan"))
                    if weights and param.requires_grad:
                        param.fill_(float("nan"))
                        break
            if loss:
                result.sums["loss_sum"] = result.sums["loss_sum"] * float("nan")
        return result
    monkeypatch.setattr(StepRunner, "run", poisoned)


def test_a_run_whose_last_step_was_skipped_fails_without_export(tmp_path, monkeypatch):
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=3"])
    _poison_last_step(monkeypatch, 3, loss=True, weights=False)
    with pytest.raises(TrainingError, match=r"the last 1 step\(s\) of the run .* skipped: the weights were not"):
        trainer_tests.train(config)
    out = tmp_path / "out"
    assert [row["skipped"] for row in trainer_tests.metrics(out)] == [False, False, True]
    assert (out / "checkpoints" / "step_000003").is_dir()  # the checkpoint logic is unchanged
    assert not (out / "final").exists()


def test_a_run_that_ends_with_nan_weights_fails_without_export(tmp_path, monkeypatch):
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=2"])
    _poison_last_step(monkeypatch, 2, loss=False, weights=True)
    with pytest.raises(TrainingError, match=r"refusing to export .* hold NaN or Inf"):
        trainer_tests.train(config)
    assert not (tmp_path / "out" / "final").exists()


def test_the_cli_exits_non_zero_with_one_line(tmp_path, monkeypatch, capsys):
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=2"])
    _poison_last_step(monkeypatch, 2, loss=True, weights=False)
    code = cli_main(["train", str(config), "--set", f"train.out_dir={tmp_path / 'out'}"])
    assert code != 0
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "pivot-mega train:" in line]
    assert len(errors) == 1 and "error on rank 0: the last 1 step(s)" in errors[0], errors
    assert "Traceback" not in stderr
    assert not (tmp_path / "out" / "final").exists()
