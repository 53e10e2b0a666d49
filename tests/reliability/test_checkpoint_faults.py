"""Damaged checkpoints, full disks, two runs on one folder: found, said in one line, and survived.

Every checkpoint records each file's size and SHA-256 before it is renamed into place; resume and
init_from verify them. A bad newest checkpoint is passed over for the newest good one (or refused with
``train.resume_fallback=false``); a save that fails removes its partial files and keeps the previous
checkpoint; ``out_dir`` is locked by the run that uses it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from pivot_mega.cli import main as cli_main
from pivot_mega.config import ConfigError
from pivot_mega.models import CheckpointError, VisionLanguageModel
from pivot_mega.training import save_checkpoint
from pivot_mega.training.checkpoint.dcp import describe_save_failure, resolve_resume
from pivot_mega.training.run_lock import LOCK_FILE, RunLock, this_holder
from tests.parallel.test_equivalence import tiny_config
from tests.training import test_trainer as trainer_tests  # a module: its tests are not collected here again
from tests.training.runs import write_tiny_run


def _scribble(path: Path, seed: int) -> None:
    """Random bytes over the middle of a file, its size unchanged."""
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    start = len(data) // 3
    data[start:start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.fixture
def two_checkpoints(tmp_path):
    """An SFT run of 4 steps with checkpoints at steps 2 and 4."""
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=4", "train.save_every=2"])
    trainer_tests.train(config)
    root = tmp_path / "out" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000004"
    return config, root


def test_every_file_of_a_checkpoint_has_its_checksum(two_checkpoints):
    _, root = two_checkpoints
    manifest = json.loads((root / "step_000004" / "checkpoint.json").read_text())
    on_disk = sorted(p.relative_to(root / "step_000004").as_posix() for p in (root / "step_000004").rglob("*")
                     if p.is_file() and p.name != "checkpoint.json")
    assert sorted(manifest["files"]) == on_disk
    assert {".metadata", "__0_0.distcp", "config.json", "rank_state/rank_00000.pt"} <= set(on_disk)
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (root / "step_000004" / name).stat().st_size


def test_a_corrupt_shard_is_passed_over_for_the_newest_good_checkpoint(two_checkpoints, caplog, seed):
    config, root = two_checkpoints
    shard = root / "step_000004" / "__0_0.distcp"
    _scribble(shard, seed)
    with caplog.at_level(logging.WARNING):
        summary = trainer_tests.train(config, "train.max_steps=6")
    assert f"{shard}: corrupt, its SHA-256 differs" in caplog.text
    assert f"resuming from {root / 'step_000002'}, the newest good checkpoint" in caplog.text
    assert summary.steps == 6 and summary.final is not None
    steps = [row["step"] for row in trainer_tests.metrics(root.parent)]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 trained again, each logged once


def test_without_fallback_a_corrupt_checkpoint_is_refused_naming_the_file(two_checkpoints, capsys, seed):
    config, root = two_checkpoints
    shard = root / "step_000004" / "__0_0.distcp"
    _scribble(shard, seed)
    rc = cli_main(["train", str(config), "--set", "train.max_steps=6", "train.resume_fallback=false"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{shard}: corrupt" in err and "train.resume_fallback=true" in err
    assert "Traceback" not in err


def test_a_truncated_file_and_a_missing_one_are_named(two_checkpoints):
    _, root = two_checkpoints
    state = root / "step_000004" / "rank_state" / "rank_00000.pt"
    state.write_bytes(state.read_bytes()[:-10])
    (root / "step_000002" / "config.json").unlink()
    with pytest.raises(CheckpointError) as raised:
        resolve_resume(root.parent, "auto")
    message = str(raised.value)
    assert f"{state}: " in message and "bytes, the checkpoint recorded" in message
    assert f"{root / 'step_000002' / 'config.json'}: missing" in message
    assert "train.resume=none starts afresh" in message


def test_init_from_a_corrupt_training_checkpoint_names_the_file(two_checkpoints, tmp_path, seed):
    config, root = two_checkpoints
    metadata_ok = root / "step_000002"
    _scribble(metadata_ok / "__0_0.distcp", seed)
    with pytest.raises(CheckpointError, match=rf"{metadata_ok / '__0_0.distcp'}: corrupt"):
        trainer_tests.train(config, f"init_from={metadata_ok}", "model=null", f"train.out_dir={tmp_path / 'next'}")


def test_a_latest_outside_the_run_gets_a_warning(two_checkpoints, tmp_path, caplog):
    _, root = two_checkpoints
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root / "step_000002", elsewhere / "step_000002")
    (root / "latest").write_text(f"{elsewhere / 'step_000002'}\n")
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(root.parent, "auto") == elsewhere / "step_000002"
    assert f"names {elsewhere / 'step_000002'}, outside this run's directory" in caplog.text


# ----------------------------------------------------------------------------------------------
# failed saves


def test_a_failed_write_is_one_line_per_rank_and_says_the_disk_is_full(tmp_path):
    failures = {}
    for rank, error in ((0, OSError(errno.ENOSPC, "No space left on device", "/x/__0_0.distcp")),
                        (1, RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598\n"
                                         "frame #0: ..."))):
        try:
            raise error
        except BaseException as e:  # noqa: BLE001 - wrapped as DCP does
            failures[rank] = (e, traceback.extract_tb(e.__traceback__))
    line = describe_save_failure(CheckpointException("write", failures), tmp_path / "step_000003.tmp")
    assert line.startswith(f"no space left on the device holding {tmp_path}")
    assert "rank 0: OSError: [Errno 28] No space left on device: '/x/__0_0.distcp'" in line
    assert "rank 1: RuntimeError: [enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598 ..." in line
    assert "\n" not in line and "frame #0" not in line
    assert describe_save_failure(ValueError("bad"), tmp_path / "x.tmp") == "ValueError: bad"


def test_a_write_error_removes_the_partial_save_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, seed):
    model = VisionLanguageModel(tiny_config()).init_weights(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(tmp_path, step=1, pmodel=model, optimizer=optimizer)
    import torch.distributed.checkpoint as dcp

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(CheckpointError, match=r"checkpoint step_000002 not saved, its partial files removed "
                                              r"\(step_000001 is kept\): no space left on the device"):
        save_checkpoint(tmp_path, step=2, pmodel=model, optimizer=optimizer)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
    assert resolve_resume(tmp_path, "auto") == root / "step_000001"


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (root only; skipped with the reason otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, small_disk, capsys):
    out = small_disk / "out"
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=2", "train.save_every=1", f"train.out_dir={out}"])
    assert cli_main(["train", str(config), "--set", "train.max_steps=1"]) == 0
    checkpoint = out / "checkpoints" / "step_000001"
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    # Leave room for half a checkpoint: the next save fills the disk part way through.
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * max(0, free - size // 2))
    capsys.readouterr()
    rc = cli_main(["train", str(config)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert f"no space left on the device holding {out / 'checkpoints'}" in err, err
    assert "checkpoint step_000002 not saved, its partial files removed (step_000001 is kept)" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000001"]
    (small_disk / "filler").unlink()
    assert cli_main(["train", str(config)]) == 0  # room again: resumes from step 1 and finishes
    assert [row["step"] for row in trainer_tests.metrics(out)] == [1, 2]


# ----------------------------------------------------------------------------------------------
# one run per out_dir


def test_a_second_run_on_a_locked_out_dir_is_refused_naming_the_holder(tmp_path, capsys):
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=1"])
    out = tmp_path / "out"
    with RunLock(out):  # a live run of this host: this process
        rc = cli_main(["train", str(config)])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"{out} is in use by another run (pid {os.getpid()} on " in err
        assert f"delete {out / LOCK_FILE} if that run has ended" in err
        assert not (out / "metrics.jsonl").exists()
    assert not (out / LOCK_FILE).exists()
    assert cli_main(["train", str(config)]) == 0
    assert not (out / LOCK_FILE).exists()  # released at the end


def _plant(out: Path, **holder) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_FILE).write_text(json.dumps({**this_holder(), **holder}) + "\n")


def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    cases = {"dead pid": ({"pid": dead.pid}, True),
             "reused pid": ({"process_start": 1}, True),
             "torn file": (None, True),
             "requeued job": ({"host": "node-a", "slurm_job_id": "77", "slurm_restart_count": "0"}, True),
             "other host": ({"host": "node-b", "pid": 1}, False),
             "this process": ({}, False)}
    os.environ["SLURM_JOB_ID"], os.environ["SLURM_RESTART_COUNT"] = "77", "1"
    try:
        for name, (holder, stale) in cases.items():
            out = tmp_path / name.replace(" ", "_")
            if holder is None:
                out.mkdir()
                (out / LOCK_FILE).write_text('{"host": "x", "pi')
            else:
                _plant(out, **({"slurm_job_id": None} if "slurm_job_id" not in holder else {}), **holder)
            if stale:
                with caplog.at_level(logging.WARNING):
                    with RunLock(out):
                        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid(), name
                assert f"taking over {out / LOCK_FILE}" in caplog.text, name
            else:
                with pytest.raises(ConfigError, match="is in use by another run"):
                    RunLock(out).acquire()
                assert (out / LOCK_FILE).exists(), name  # a refusal leaves the holder's lock alone
    finally:
        del os.environ["SLURM_JOB_ID"], os.environ["SLURM_RESTART_COUNT"]


def test_a_torn_shard_of_a_checkpoint_without_checksums_fails_in_one_line(two_checkpoints, capsys, caplog):
    """Checkpoints of older versions record no checksums: DCP's own error (a BaseException) is unwrapped."""
    config, root = two_checkpoints
    for step in ("step_000002", "step_000004"):
        manifest_path = root / step / "checkpoint.json"
        manifest = json.loads(manifest_path.read_text())
        del manifest["files"]
        manifest_path.write_text(json.dumps(manifest))
    shard = root / "step_000004" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        rc = cli_main(["train", str(config), "--set", "train.max_steps=6"])
    err = capsys.readouterr().err
    assert "records no checksums (written by an older pivot_mega): not verified" in caplog.text
    assert rc == 2, err
    assert f"{root / 'step_000004'}: reading the checkpoint failed: rank 0: " in err, err
    assert "Traceback" not in err and "CheckpointException ranks" not in err


def test_the_cli_says_a_dcp_failure_in_one_line(monkeypatch, capsys):
    from pivot_mega import cli

    def failing(args):
        try:
            raise OSError(errno.EIO, "Input/output error", "/lustre/run/__3_0.distcp")
        except OSError as e:
            raise CheckpointException("read", {3: (e, traceback.extract_tb(e.__traceback__))}) from None
    parser, runners = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: (parser, {**runners, "train": failing}))
    assert cli.main(["train", "x.yaml"]) == 2
    assert capsys.readouterr().err == ("pivot-mega train: error: checkpoint: rank 3: OSError: [Errno 5] Input/output "
                                       "error: '/lustre/run/__3_0.distcp'\n")
