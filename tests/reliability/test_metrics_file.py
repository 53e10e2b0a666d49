"""metrics.jsonl survives a torn last line and a kill during the resume-time rewrite."""

from __future__ import annotations

import json
import logging
import os

import pytest

from pivot_mega.training import metrics as metrics_module
from pivot_mega.training.metrics import METRICS_FILE, MetricsFileError, MetricsLogger, read_metrics_lines
from tests.training.runs import write_tiny_run
from tests.training.test_trainer import metrics, train

TORN = '{"step": 3, "loss": 0.5, "ti'


def _records(steps) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def _logger(out_dir) -> MetricsLogger:
    return MetricsLogger(out_dir, enabled=True, total_steps=10, start_step=0, progress=False, tensorboard=False,
                         log_every=100, stage="sft", num_devices=1, peak_tflops=None)


@pytest.mark.parametrize("after", ["", "\n", "\n\n"])
def test_a_torn_last_line_is_dropped_with_one_warning(tmp_path, caplog, after):
    path = tmp_path / METRICS_FILE
    path.write_text(_records([1, 2]) + TORN + after)
    with caplog.at_level(logging.WARNING, logger=metrics_module.__name__):
        assert [record["step"] for _, record in read_metrics_lines(path)] == [1, 2]
    assert [r.getMessage() for r in caplog.records] == [f"metrics: dropped a torn last line of {path} ({len(TORN)} bytes)"]


def test_a_corrupt_middle_line_names_the_file_and_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text(_records([1]) + TORN + "\n" + _records([2]))
    with pytest.raises(MetricsFileError, match=f"{path}: line 2 "):
        read_metrics_lines(path)


@pytest.mark.parametrize("keep", [0, 2])
def test_truncate_after_drops_the_torn_line_and_the_later_steps(tmp_path, keep):
    (tmp_path / METRICS_FILE).write_text(_records([1, 2, 3]) + TORN)
    logger = _logger(tmp_path)
    logger.truncate_after(keep)
    assert (tmp_path / METRICS_FILE).read_text() == _records(range(1, keep + 1))


def test_appending_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    (tmp_path / METRICS_FILE).write_text(_records([1, 2]) + TORN)
    logger = _logger(tmp_path)
    logger.log(3, {"loss": 0.25})
    logger.close()
    assert [record["step"] for record in metrics(tmp_path)] == [1, 2, 3]


def test_a_kill_during_the_rewrite_leaves_the_file_intact(tmp_path, monkeypatch):
    original = _records(range(1, 50)) + TORN
    (tmp_path / METRICS_FILE).write_text(original)

    def killed(src, dst):
        raise KeyboardInterrupt("killed mid-rewrite")
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _logger(tmp_path).truncate_after(10)
    assert (tmp_path / METRICS_FILE).read_text() == original


def test_runs_start_after_a_torn_last_line(tmp_path):
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=2", "train.save_every=2"])
    out = tmp_path / "out"
    train(config)
    with open(out / METRICS_FILE, "a") as f:
        f.write(TORN)
    train(config, "train.max_steps=4")  # resumes from step 2
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    with open(out / METRICS_FILE, "a") as f:
        f.write(TORN)
    train(config, "train.max_steps=1", "train.resume=none")
    assert [m["step"] for m in metrics(out)] == [1]
