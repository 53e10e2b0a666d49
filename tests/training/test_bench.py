"""``pivot-mega bench``: its checks fail when they should, before the work where they can."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

import pivot_mega.training.bench as bench
from pivot_mega.batch import Targets
from pivot_mega.cli import main


def _bench(capsys, *args) -> tuple[int, str, str]:
    code = main(["bench", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def no_model_build(monkeypatch):
    """Fails the test if the bench gets as far as building a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the bench built a model before refusing")
    monkeypatch.setattr(bench, "parallelize", refuse)


def test_compare_naive_checks_a_loss_away_from_ln2_and_measures_each_path(capsys, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # what main sets, undone after
    code, out, err = _bench(capsys, "--preset", "tiny", "--compare-naive", "--steps", "1", "--warmup", "0")
    assert code == 0, err
    results = json.loads(out)
    check = results["loss_check"]
    assert check["distance_from_ln2"] > bench.MIN_DISTANCE_FROM_LN2
    assert abs(check["optimised"] - math.log(2)) > bench.MIN_DISTANCE_FROM_LN2
    assert check["rel_diff"] <= check["tolerance"] and check["logps_rel_diff"] <= check["tolerance"]
    for name in ("optimised", "naive"):  # measured apart: not one process's high-water mark twice
        assert results[name]["memory_measured"] in (("reset peak stats",) if torch.cuda.is_available()
                                                    else ("own process, peak reset", "own process"))
        assert results[name]["peak_memory_gb"] > 0 and results[name]["step_memory_gb"] >= 0
    if not torch.cuda.is_available():  # a process of its own per path
        pids = {results["optimised"]["memory_pid"], results["naive"]["memory_pid"], os.getpid()}
        assert len(pids) == 3
    assert results["memory_naive_over_optimised"] == pytest.approx(
        results["naive"]["peak_memory_gb"] / results["optimised"]["peak_memory_gb"])


def test_a_broken_label_shift_in_the_optimised_path_fails_the_bench(capsys, monkeypatch):
    # The naive step shifts the labels itself; the optimised one reads Targets.next_tokens.
    next_tokens = Targets.next_tokens

    def off_by_one(*args, **kwargs):
        targets = next_tokens(*args, **kwargs)
        return Targets(targets.positions, targets.tokens.roll(1), targets.sequence, targets.num_sequences)
    monkeypatch.setattr(Targets, "next_tokens", staticmethod(off_by_one))
    code, out, err = _bench(capsys, "--preset", "tiny", "--compare-naive", "--steps", "1", "--warmup", "0")
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pivot-mega bench: check failed: the optimised and naive DPO "
                                                   "steps disagree"), err


def test_a_reference_equal_to_the_policy_voids_the_check(monkeypatch):
    monkeypatch.setattr(bench, "REFERENCE_NOISE", 0.0)  # every DPO loss is then ln 2
    with pytest.raises(bench.BenchCheckFailed, match="the loss check is void"):
        bench.run_benchmark(bench.BenchOptions(preset="tiny", compare_naive=True, steps=1, warmup=0))


def test_check_agreement_bounds_loss_and_log_probs():
    logps = torch.tensor([[-50.0, -52.0], [-48.0, -47.0]])
    assert bench.check_agreement(0.6, 0.6, logps, logps, "fp32")["rel_diff"] == 0
    with pytest.raises(bench.BenchCheckFailed, match="disagree"):
        bench.check_agreement(0.6, 0.6 * (1 + 1e-3), logps, logps, "fp32")
    with pytest.raises(bench.BenchCheckFailed, match="disagree"):
        bench.check_agreement(0.6, 0.6, logps + 0.1, logps, "fp32")
    assert bench.check_agreement(0.6, 0.6 * (1 + 1e-3), logps, logps, "bf16")["rel_diff"] < 2e-2


def test_a_row_too_short_for_the_image_tokens_is_refused_before_the_model_is_built(capsys, no_model_build):
    code, out, err = _bench(capsys, "--preset", "tiny", "--seq-len", "8")
    assert code == 2 and out == ""
    assert err.startswith("pivot-mega bench: error: --seq-len 8: rows must hold 2 sequences of")
    assert err.count("\n") == 1


def test_a_model_that_cannot_fit_is_refused_with_what_it_needs(capsys, monkeypatch, no_model_build):
    monkeypatch.setattr(bench, "available_memory_bytes", lambda device_type: (24 * 2**30, "MemAvailable (test)"))
    start = time.monotonic()
    code, out, err = _bench(capsys, "--preset", "pivot-1.5b", "--steps", "1")
    assert time.monotonic() - start < 30
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("pivot-mega bench: error: --preset pivot-1.5b: its training state")
    assert "GiB and 24.0 GiB is available (MemAvailable (test))" in err


def test_available_memory_reads_this_machine():
    available, source = bench.available_memory_bytes("cuda" if torch.cuda.is_available() else "cpu")
    assert available > 0 and source
