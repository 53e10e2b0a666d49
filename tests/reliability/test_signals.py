"""SIGTERM / SIGUSR1 in every phase of a run: while importing, during start-up, in the DPO reference
pass, mid-run. Each stops the run cleanly, exit 0, saying where it stopped; the next run goes on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pivot_mega.cli import main as cli_main
from pivot_mega.training import reference as reference_module
from pivot_mega.training import trainer as trainer_module
from tests.training import test_trainer as trainer_tests  # a module: its tests are not collected here again
from tests.training.runs import REPO, write_tiny_run


@pytest.mark.slow
def test_sigterm_while_the_command_imports_stops_cleanly(tmp_path):
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = subprocess.Popen([sys.executable, "-c", "import sys, time; t = time.time(); "
                                "import pivot_mega.cli; print(time.time() - t)"], env=env, stdout=subprocess.PIPE,
                               text=True)
    import_seconds = float(started.communicate(timeout=120)[0])
    run = subprocess.Popen([sys.executable, "-m", "pivot_mega.cli", "train", str(config)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(min(0.5, import_seconds / 4))  # the interpreter is up, torch still importing
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=240)[0]
    assert run.returncode == 0, output
    assert "SIGTERM received while starting" in output, output
    assert "stopped by SIGTERM after step 0; nothing to save" in output, output
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "final").exists()


def _signal_self_when(monkeypatch, owner, name: str, signum: int) -> None:
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapped)


def test_sigterm_during_start_up_stops_before_the_first_step(tmp_path, monkeypatch, capsys):
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=2", "train.save_every=1"])
    assert cli_main(["train", str(config), "--set", "train.max_steps=1"]) == 0
    _signal_self_when(monkeypatch, trainer_module, "resolve_resume", signal.SIGTERM)
    capsys.readouterr()
    assert cli_main(["train", str(config)]) == 0
    err = capsys.readouterr().err
    checkpoint = tmp_path / "out" / "checkpoints" / "step_000001"
    assert f"stopped by SIGTERM after step 1; nothing new to save (checkpoint {checkpoint})" in err, err
    assert [row["step"] for row in trainer_tests.metrics(tmp_path / "out")] == [1]
    monkeypatch.undo()
    assert cli_main(["train", str(config)]) == 0
    assert [row["step"] for row in trainer_tests.metrics(tmp_path / "out")] == [1, 2]


def test_sigusr1_during_the_reference_pass_stops_it_and_the_next_run_redoes_it(tmp_path, monkeypatch, capsys):
    config = write_tiny_run(tmp_path, "dpo", ["train.max_steps=2", "dpo.reference=precomputed",
                                              "dpo.precompute_reference=true"])
    reference_file = tmp_path / "out" / "reference_logps.json"
    _signal_self_when(monkeypatch, reference_module.OnlineReference, "logps", signal.SIGUSR1)
    assert cli_main(["train", str(config)]) == 0
    err = capsys.readouterr().err
    assert "stopped by SIGUSR1 during the DPO reference pass, after " in err, err
    assert "nothing was written: the pass runs again on resume" in err
    assert not reference_file.exists() and not (tmp_path / "out" / "metrics.jsonl").exists()
    monkeypatch.undo()
    assert cli_main(["train", str(config)]) == 0
    assert reference_file.is_file()
    assert [row["step"] for row in trainer_tests.metrics(tmp_path / "out")] == [1, 2]
