"""What the data does at train time is said: skipped samples per step in metrics.jsonl (``data/skipped``,
by reason) and in the run's last lines, a run losing more than ``data.max_skipped_fraction`` of what it
reads stops with one line, and a global batch smaller than one micro-batch gets a warning."""

from __future__ import annotations

import pytest

from pivot_mega.cli import main as cli_main
from tests.reliability.test_bad_shards import _image_ext, _overwrite
from tests.training import test_trainer as trainer_tests  # a module: its tests are not collected here again
from tests.training.runs import write_tiny_run


def _spoil_images(config, shards, indices) -> None:
    for index in indices:
        _overwrite(shards, index, _image_ext(shards, index), b"not an image")


def test_skipped_samples_are_counted_per_step_and_in_the_summary(tmp_path, capsys):
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=8", "data.max_skipped_fraction=0.5"])  # an epoch
    shards = tmp_path / "shards_dpo"
    _spoil_images(config, shards, [1, 5])
    assert cli_main(["train", str(config)]) == 0
    rows = trainer_tests.metrics(tmp_path / "out")
    assert rows[-1]["data/skipped"] == rows[-1]["data/skipped/bad_image"] >= 1
    counts = [row["data/skipped"] for row in rows]
    assert counts == sorted(counts)  # totals so far in the run
    err = capsys.readouterr().err
    assert f"{rows[-1]['data/skipped']} sample(s) skipped in all, by reason {{'bad_image': " in err, err


def test_a_run_losing_its_data_stops_in_one_line(tmp_path, capsys):
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=40", "data.max_skipped_fraction=0.05"],
                            samples=24)
    shards = tmp_path / "shards_dpo"
    _spoil_images(config, shards, range(0, 24, 4))  # a sixth of the data
    assert cli_main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "samples read so far were skipped" in err and "above data.max_skipped_fraction=0.05" in err, err
    assert "'bad_image'" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.parametrize("fraction", [0.5])
def test_below_the_limit_the_run_goes_on(tmp_path, fraction):
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=40", f"data.max_skipped_fraction={fraction}"])
    _spoil_images(config, tmp_path / "shards_dpo", range(0, 24, 4))
    summary = trainer_tests.train(config)
    assert summary.final is not None and summary.last_metrics["data/skipped/bad_image"] >= 1


def test_a_global_batch_smaller_than_a_micro_batch_is_said(tmp_path, caplog):
    import logging
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=2", "train.global_batch_size=1",
                                              "data.micro_batch_rows=4"])
    with caplog.at_level(logging.WARNING):
        trainer_tests.train(config)
    assert "train.global_batch_size=1 is smaller than one micro-batch, which holds" in caplog.text
    assert caplog.text.count("is smaller than one micro-batch") == 1
    assert all(row["samples"] > 1 for row in trainer_tests.metrics(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------
# A sample left out for a broken image leaves the step's normaliser too

BROKEN_SAMPLE = 3


def _without_sample(directory, kind: str, index: int):
    """The run's shards rebuilt without sample ``index`` (the same images, the other samples)."""
    import json

    from pivot_mega.data.shard_builder import BuildOptions, build_shards

    rows = json.loads((directory / f"{kind}.json").read_text())
    del rows[index]
    (directory / f"{kind}_without.json").write_text(json.dumps(rows))
    out = directory / "shards_without"
    build_shards(kind, directory / f"{kind}_without.json", out, directory / "img",
                 BuildOptions(samples_per_shard=8, workers=1, progress=False))
    return out


def _one_epoch_step(tmp_path, stage: str, *overrides: str) -> dict:
    # One step of the whole epoch: the step trains on the same samples however they are packed.
    config = write_tiny_run(tmp_path, stage, ["train.max_steps=1", "train.epochs=1", "train.global_batch_size=64",
                                              "data.max_skipped_fraction=0.5", *overrides], samples=12)
    summary = trainer_tests.train(config, *overrides)
    assert summary.steps == 1
    return trainer_tests.metrics(tmp_path / "out")[0]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_broken_image_leaves_the_loss_normaliser(tmp_path, stage):
    """The step's loss and gradient norm with a broken image equal those of the same run on shards
    without that sample: the loss is a mean over what was trained, not over what was planned (before
    the fix, both were smaller by the fraction left out: SFT's loss 5.91 against 6.24, DPO's 0.635 against
    ln 2 = 0.693)."""
    broken_run, clean_run = tmp_path / "broken", tmp_path / "clean"
    write_tiny_run(broken_run, stage, samples=12)
    _spoil_images(None, broken_run / "shards_dpo", [BROKEN_SAMPLE])
    broken = _one_epoch_step(broken_run, stage)
    assert broken["data/skipped/bad_image"] == 1 and broken["samples"] == 11
    write_tiny_run(clean_run, stage, samples=12)
    shards = _without_sample(clean_run, "dpo", BROKEN_SAMPLE)
    clean = _one_epoch_step(clean_run, stage, f"data.shards={shards}")
    assert clean["data/skipped"] == 0 and clean["samples"] == 11
    for key in ("loss", "grad_norm"):  # fp32 sums over different packings
        assert broken[key] == pytest.approx(clean[key], rel=1e-5), (key, broken[key], clean[key])
