"""``pivot-mega train`` end to end on tiny models and generated shards (CPU, gloo)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pivot_mega.models.checkpoint_io import read_checkpoint
from pivot_mega.models.mllm import VisionLanguageModel
from pivot_mega.training.checkpoint import resolve_resume
from pivot_mega.training.config import load_run_config
from pivot_mega.training.trainer import Trainer, TrainingError
from tests.distributed import require_procs, run_workers
from tests.hf_models import record
from tests.training.runs import REPO, write_tiny_run

DPO_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "ref_logps/chosen", "ref_logps/rejected")


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(out_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(out_dir)]


def train(config_path: Path, *overrides: str):
    return Trainer(load_run_config(config_path, list(overrides))).run()


def test_the_four_stages_chain_and_train_only_their_towers(tmp_path):
    """1a → 1b → SFT → DPO, each from the previous stage's export; frozen towers stay bitwise equal."""
    previous = None
    for stage in ("pretrain_projector", "pretrain_full", "sft", "dpo"):
        config = write_tiny_run(tmp_path / stage, stage, ["train.max_steps=3", "train.tensorboard=true",
                                                          f"train.export_hf={stage == 'dpo'}"])
        overrides = [f"init_from={previous}"] if previous else []
        summary = train(config, *overrides)
        out = tmp_path / stage / "out"
        rows = metrics(out)
        assert summary.steps == 3 and [r["step"] for r in rows] == [1, 2, 3]
        assert all(math.isfinite(r["loss"]) and r["samples"] >= 4 for r in rows)
        assert any((out / "tensorboard").iterdir())
        if stage == "dpo":
            assert all(k in rows[0] for k in DPO_KEYS)
            from transformers import LlavaForConditionalGeneration, SiglipVisionModel
            LlavaForConditionalGeneration.from_pretrained(out / "hf" / "llava")
            SiglipVisionModel.from_pretrained(out / "hf" / "siglip")
            assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1

        _, before, _ = read_checkpoint(previous) if previous else (None, _initial_tensors(config), None)
        _, after, _ = read_checkpoint(summary.final)
        trains = {"pretrain_projector": ("projector",)}.get(stage, ("vision", "projector", "language"))
        for name, tensor in after.items():
            if name.split(".")[0] not in trains:
                assert torch.equal(tensor, before[name]), f"{stage}: frozen {name} changed"
        for tower in trains:
            assert any(not torch.equal(t, before[n]) for n, t in after.items() if n.startswith(tower)), tower
        if stage == "pretrain_projector":  # frozen towers have no optimizer state
            from torch.distributed.checkpoint import FileSystemReader
            keys = FileSystemReader(str(out / "checkpoints" / "step_000003")).read_metadata().state_dict_metadata
            state = [k for k in keys if k.startswith("optimizer.state.")]
            assert state and all(k.startswith("optimizer.state.projector.") for k in state)
        previous = summary.final


def _initial_tensors(config_path: Path) -> dict:
    config = load_run_config(config_path)
    model = VisionLanguageModel(config.model).init_weights(config.train.seed)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_precomputed_reference_gives_the_online_losses(tmp_path):
    config = write_tiny_run(tmp_path, "dpo", ["train.max_steps=4", "train.epochs=2", "train.global_batch_size=8",
                                              "dpo.loss_type=mpo"])
    train(config, f"train.out_dir={tmp_path / 'online'}")
    train(config, f"train.out_dir={tmp_path / 'pre'}", "dpo.precompute_reference=true")
    online, pre = metrics(tmp_path / "online"), metrics(tmp_path / "pre")
    assert len(online) == len(pre) == 4 and online[-1]["epoch"] == 1  # the second epoch reads the file
    for a, b in zip(online, pre):
        for key in ("loss", "ref_logps/chosen", "ref_logps/rejected", "rewards/margins", "loss/quality"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    table = json.loads((tmp_path / "pre" / "reference_logps.json").read_text())
    assert len(table["pairs"]) == 24

    # A pair the file lacks is an error that names it.
    del table["pairs"]["dpo-3"]
    (tmp_path / "pre" / "reference_logps.json").write_text(json.dumps(table))
    from pivot_mega.training.reference import ReferenceError
    with pytest.raises(ReferenceError, match="dpo-3"):
        train(config, f"train.out_dir={tmp_path / 'pre2'}", "dpo.reference=precomputed",
              f"dpo.reference_logps={tmp_path / 'pre' / 'reference_logps.json'}", "train.max_steps=12")


def _run_cli(config: Path, *overrides: str, **popen) -> subprocess.Popen:
    # One thread for OpenMP and MKL alike: `make test` sets MKL_NUM_THREADS=2, and MKL may then use fewer threads
    # on a loaded machine (MKL_DYNAMIC), splitting a reduction another way: runs compared bit for bit must not.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "pivot_mega.cli", "train", str(config), "--set", *overrides],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_sigterm_saves_and_the_resumed_run_repeats_the_straight_one_exactly(tmp_path):
    config = write_tiny_run(tmp_path, "dpo", ["train.max_steps=8", "dpo.loss_type=bco_pair"])
    straight = _run_cli(config, f"train.out_dir={tmp_path / 'straight'}")
    output = straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, output

    out = tmp_path / "cut"
    first = _run_cli(config, f"train.out_dir={out}")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2:
            first.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    output = first.communicate(timeout=240)[0]
    assert first.returncode == 0, output
    assert "stopped by SIGTERM" in output, output
    stopped_at = len(metrics(out))
    assert 2 <= stopped_at < 8, output
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:06d}"
    assert not (out / "final").exists()

    second = _run_cli(config, f"train.out_dir={out}")
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:06d}'} at step {stopped_at}" in output
    assert [m["step"] for m in metrics(out)] == list(range(1, 9))
    assert losses(out) == losses(tmp_path / "straight")  # bitwise: same data, same RNG, same arithmetic
    assert metrics(out)[-1]["rewards/margins"] == metrics(tmp_path / "straight")[-1]["rewards/margins"]
    a, _, _ = read_checkpoint(out / "final"), None, None
    b = read_checkpoint(tmp_path / "straight" / "final")
    assert all(torch.equal(a[1][k], b[1][k]) for k in b[1])


def test_sigusr1_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch):
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=6"])
    from pivot_mega.training import metrics as metrics_module
    log = metrics_module.MetricsLogger.log

    def log_and_signal(self, step, values):
        log(self, step, values)
        if step == 2:
            signal.raise_signal(signal.SIGUSR1)
    monkeypatch.setattr(metrics_module.MetricsLogger, "log", log_and_signal)
    summary = train(config)
    assert summary.stopped_by == "SIGUSR1" and summary.steps == 3 and summary.final is None
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=6", "train.max_bad_steps=2", "train.save_every=1"])
    from pivot_mega.training.steps import StepRunner
    run = StepRunner.run
    calls = {"n": 0}

    def poisoned(self, batches):
        result = run(self, batches)
        calls["n"] += 1
        if calls["n"] >= 2:  # steps 2 and 3 blow up
            result.sums["loss_sum"] = result.sums["loss_sum"] * float("nan")
            for param in self.pmodel.parameters():
                if param.grad is not None:
                    param.grad.fill_(float("nan"))
        return result
    monkeypatch.setattr(StepRunner, "run", poisoned)
    with pytest.raises(TrainingError, match="2 steps in a row had a non-finite loss"):
        train(config)
    out = tmp_path / "out"
    rows = metrics(out)
    assert [r["skipped"] for r in rows] == [False, True, True]
    assert rows[1]["bad_steps"] == 1 and rows[2]["bad_steps"] == 2
    # The skipped step changed no weight: its checkpoint holds step 1's model.
    from pivot_mega.training.checkpoint import export_model, load_checkpoint  # noqa: F401
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    for step in (1, 2):
        dcp_to_torch_save(out / "checkpoints" / f"step_{step:06d}", tmp_path / f"s{step}.pt")
    one, two = (torch.load(tmp_path / f"s{s}.pt", weights_only=True)["model"] for s in (1, 2))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not (out / "checkpoints" / "step_000003").exists()


def test_an_error_after_an_async_save_lets_the_write_finish_uncommitted(tmp_path, monkeypatch):
    """Step 3 fails while step 2's checkpoint is written in the background: the run waits for the
    write (before anything destroys its process group) and leaves it uncommitted, a .tmp that
    resume skips; step 1's checkpoint, completed before step 2's began, is the latest."""
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=4", "train.save_every=1", "train.async_save=true"])
    from pivot_mega.training.steps import StepRunner
    run = StepRunner.run
    calls = {"n": 0}

    def failing(self, batches):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("lost a GPU")
        return run(self, batches)
    monkeypatch.setattr(StepRunner, "run", failing)
    with pytest.raises(RuntimeError, match="lost a GPU"):
        train(config)
    root = tmp_path / "out" / "checkpoints"
    written = root / "step_000002.tmp"
    assert (written / ".metadata").is_file() and not (written / "checkpoint.json").exists()
    assert (root / "latest").read_text().strip() == "step_000001"
    assert resolve_resume(tmp_path / "out", "auto") == root / "step_000001"


# ----------------------------------------------------------------------------------------------
# parallel layouts: every step takes the whole epoch, so any data-parallel split sees the same batch

FULL_EPOCH = ["train.global_batch_size=12", "train.epochs=3", "train.max_steps=3", "data.window_size=64",
              "optim.lr=1e-3", "dpo.loss_type=bco_pair"]
LAYOUTS = {
    "tp2": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "fsdp2": [],
}


def _layout_worker(rank, world_size, config, out_dir, overrides):
    summary = Trainer(load_run_config(config, [f"train.out_dir={out_dir}", *overrides])).run()
    return summary.steps


@pytest.fixture(scope="module")
def full_epoch_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full_epoch")
    config = write_tiny_run(tmp, "dpo", FULL_EPOCH, samples=12)
    train(config, f"train.out_dir={tmp / 'single'}")
    return config, tmp


@require_procs(2)
@pytest.mark.multiproc
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_layouts_give_the_single_process_losses(full_epoch_run, layout):
    config, tmp = full_epoch_run
    out = tmp / layout
    assert run_workers(_layout_worker, 2, config, out, LAYOUTS[layout], timeout=400) == [3, 3]
    single, parallel = metrics(tmp / "single"), metrics(out)
    assert len(single) == len(parallel) == 3
    _close_metrics(single, parallel, layout)
    assert all(a["samples"] == b["samples"] == 12 for a, b in zip(single, parallel))


def _close_metrics(single: list[dict], parallel: list[dict], what: str, tolerance: float = 1e-4) -> None:
    assert len(single) == len(parallel)
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        error = max(abs(b[key] - a[key]) / max(abs(a[key]), 1e-6) for a, b in zip(single, parallel))
        record("train_vs_single_process", f"{what}:{key}", error)
        assert error <= tolerance, (what, key, [(a[key], b[key]) for a, b in zip(single, parallel)])


def test_shared_prefix_pairs_train_like_separate_ones(full_epoch_run):
    """Every step holds the whole epoch, so both layouts see the same pairs: the same losses and gradients."""
    config, tmp = full_epoch_run  # its single-process run lays pairs out with a shared prefix (the default)
    train(config, f"train.out_dir={tmp / 'separate'}", "data.dpo_layout=separate")
    shared, separate = metrics(tmp / "single"), metrics(tmp / "separate")
    _close_metrics(separate, shared, "shared_prefix_vs_separate", 1e-5)
    assert all(a["tokens"] < b["tokens"] for a, b in zip(shared, separate))  # each prompt once


@require_procs(2)
@pytest.mark.multiproc
def test_interleaved_pipeline_gives_the_single_process_losses(full_epoch_run):
    config, tmp = full_epoch_run
    # Two stages on each of the two ranks; rows of 256 tokens hold two pairs, so the epoch is 6 micro-batches,
    # a whole number of pipeline stages: the interleaved step holds what the single-process step holds.
    deeper = ["model.language.num_hidden_layers=4", "data.max_seq_len=256"]
    train(config, f"train.out_dir={tmp / 'single_4_layers'}", *deeper)
    layout = ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_stages=2",
              "parallel.pipeline_schedule=interleaved_1f1b", *deeper]
    assert run_workers(_layout_worker, 2, config, tmp / "interleaved", layout, timeout=400) == [3, 3]
    single, interleaved = metrics(tmp / "single_4_layers"), metrics(tmp / "interleaved")
    assert [m["micro_batches"] for m in single] == [m["micro_batches"] for m in interleaved] == [6, 6, 6]
    _close_metrics(single, interleaved, "pp2_interleaved")


@require_procs(4)
@pytest.mark.multiproc
def test_tensor_and_pipeline_parallel_together_give_the_single_process_losses(full_epoch_run):
    config, tmp = full_epoch_run
    layout = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
              "parallel.pipeline_model_parallel_size=2"]
    assert run_workers(_layout_worker, 4, config, tmp / "tp2_pp2", layout, timeout=600) == [3] * 4
    _close_metrics(metrics(tmp / "single"), metrics(tmp / "tp2_pp2"), "tp2_pp2")


@require_procs(2)
@pytest.mark.multiproc
def test_resume_on_another_layout(full_epoch_run):
    """One process writes steps 1-2, tensor parallelism over two ranks resumes and does step 3."""
    config, tmp = full_epoch_run
    out = tmp / "relayout"
    train(config, f"train.out_dir={out}", "train.max_steps=2")
    # max_steps also sets the LR schedule's length: resume with the straight run's 3
    overrides = ["parallel.tensor_model_parallel_size=2", "train.max_steps=3"]
    assert run_workers(_layout_worker, 2, config, out, overrides, timeout=400) == [3, 3]
    straight, resumed = metrics(tmp / "single"), metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert resumed[-1]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-4)


def test_dpo_learns_to_see_colours(tmp_path):
    """The chosen answer names the image's colour, the rejected one another colour: only the image tells
    them apart, so reward accuracy well above chance means the model learned to use it."""
    config = write_tiny_run(tmp_path, "dpo", ["train.max_steps=30", "train.global_batch_size=8", "optim.lr=2e-3",
                                              "optim.warmup_ratio=0.05", "dpo.beta=0.5", "train.epochs=100"],
                            samples=32, colours=True)
    train(config)
    rows = metrics(tmp_path / "out")
    late = [r["rewards/accuracies"] for r in rows[-8:]]
    assert sum(late) / len(late) >= 0.8, [round(r["rewards/accuracies"], 2) for r in rows]
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]


def test_bench_steps_agree_with_the_naive_step():
    from pivot_mega.training.bench import BenchOptions, run_benchmark
    results = run_benchmark(BenchOptions(stage="dpo", preset="tiny", steps=1, warmup=1, compare_naive=True))
    assert results["loss_check"]["abs_diff"] <= 1e-5
    assert results["optimised"]["tokens_per_s"] > 0 and results["speedup_vs_naive"] > 0
    online = run_benchmark(BenchOptions(stage="dpo", preset="tiny", steps=1, warmup=0, reference="online"))
    assert online["optimised"]["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    for stage in ("pretrain_projector", "sft"):
        assert run_benchmark(BenchOptions(stage=stage, preset="tiny", steps=1, warmup=0))["optimised"]["step_time_s"] > 0
    fp8 = run_benchmark(BenchOptions(stage="sft", preset="tiny", steps=1, warmup=0, fp8="torchao"))
    assert fp8["fp8"] == "torchao" and math.isfinite(fp8["optimised"]["first_loss"])


def test_bench_command_destroys_the_process_group_it_made(capsys, monkeypatch):
    import torch.distributed as dist

    from pivot_mega.cli import main

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # what main sets, undone after
    assert main(["bench", "--preset", "tiny", "--stage", "sft", "--steps", "1", "--warmup", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["optimised"]["step_time_s"] > 0
    assert not dist.is_initialized()


def test_torch_profiler_window_traces_the_steps_phases(tmp_path):
    config = write_tiny_run(tmp_path, "sft", ["train.max_steps=3", "profile.torch_steps=[2, 3]"])
    train(config)
    trace = tmp_path / "out" / "profile" / "torch_trace_rank0_steps2-3.json"
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert {"step_2", "step_3", "data", "forward_backward", "optimizer", "clip_grad_norm"} <= names
    assert "step_1" not in names


def test_cli_reports_input_errors_in_one_line(tmp_path):
    config = write_tiny_run(tmp_path, "dpo", ["train.max_steps=2", "dpo.reference=precomputed",
                                              f"dpo.reference_logps={tmp_path / 'missing.json'}"])
    process = _run_cli(config, f"train.out_dir={tmp_path / 'out'}")
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 2, output
    assert "pivot-mega train: error on rank 0:" in output and "missing.json" in output
    assert "Traceback" not in output
