"""The trainer's numbers do not drift: DPO, SFT, pretraining and pipelined runs against recorded values.

``same_numbers.json`` holds every per-step metric (losses, rewards, log-probs, gradient norms, counts)
of a few tiny runs, recorded from the code before a refactor. A refactor must leave them bitwise
equal on the machine that recorded them; elsewhere CPU kernels (vector width, thread split) may round
differently, so the comparison allows 1e-5 relative (training these toys for 5 steps amplifies a
last-bit difference to about 1e-7). Re-record on purpose only, when a change is meant to alter
the numbers:

    python -m tests.training.test_same_numbers --write
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import require_procs, run_workers

RECORD = Path(__file__).with_name("same_numbers.json")
# Wall-clock figures and host memory differ from run to run; everything else is a number of the model.
VOLATILE = ("time", "tokens_per_s", "tflops", "mfu", "data_wait", "memory", "step_time", "samples_per_s",
            "peak", "throughput")
RELATIVE_TOLERANCE = 1e-5

DPO = ["train.max_steps=5", "train.global_batch_size=4", "optim.warmup_ratio=0"]
SEPARATE = [*DPO, "data.dpo_layout=separate"]  # recorded before shared-prefix pairs existed
RUNS = {
    # name: (stage, overrides, processes)
    "dpo_sigmoid": ("dpo", SEPARATE, 1),
    "dpo_mpo_precomputed": ("dpo", [*SEPARATE, "dpo.loss_type=mpo", "dpo.precompute_reference=true"], 1),
    "dpo_bco_pair_two_rows": ("dpo", [*SEPARATE, "dpo.loss_type=bco_pair", "data.micro_batch_rows=2"], 1),
    "sft": ("sft", DPO, 1),
    "pretrain_full": ("pretrain_full", DPO, 1),
    "dpo_pp2": ("dpo", [*SEPARATE, "parallel.pipeline_model_parallel_size=2"], 2),
    "sft_pp2_two_rows": ("sft", [*DPO, "parallel.pipeline_model_parallel_size=2", "data.micro_batch_rows=2"], 2),
    "dpo_tp2_sp": ("dpo", [*SEPARATE, "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"], 2),
    # shared-prefix pairs, recorded when they were added
    "dpo_shared_prefix": ("dpo", [*DPO, "data.dpo_layout=shared_prefix"], 1),
    "dpo_shared_prefix_pp2": ("dpo", [*DPO, "data.dpo_layout=shared_prefix", "parallel.pipeline_model_parallel_size=2"],
                              2),
}


def _worker(rank, world_size, config_path, out_dir):
    from pivot_mega.training.config import load_run_config
    from pivot_mega.training.trainer import Trainer

    torch.set_num_threads(1)
    Trainer(load_run_config(config_path, [f"train.out_dir={out_dir}"])).run()
    return 0


def run(name: str, directory: Path) -> list[dict]:
    """Trains run ``name`` in ``directory``; → its metrics.jsonl rows without wall-clock figures."""
    from tests.training.runs import write_tiny_run

    stage, overrides, processes = RUNS[name]
    config = write_tiny_run(directory, stage, overrides)
    out = directory / "out"
    run_workers(_worker, processes, config, out, timeout=500)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not any(word in k for word in VOLATILE)} for row in rows]


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return abs(a - b) <= RELATIVE_TOLERANCE * max(abs(a), abs(b), 1e-6)
    return a == b


@pytest.mark.slow
@pytest.mark.multiproc
@require_procs(2)
@pytest.mark.parametrize("name", sorted(RUNS))
def test_runs_give_the_recorded_numbers(tmp_path, name):
    recorded = json.loads(RECORD.read_text())[name]
    rows = run(name, tmp_path)
    assert [r["step"] for r in rows] == [r["step"] for r in recorded]
    for got, want in zip(rows, recorded):
        assert set(got) == set(want), (name, sorted(set(got) ^ set(want)))
        wrong = {k: (want[k], got[k]) for k in want if not _close(want[k], got[k])}
        assert not wrong, (name, got["step"], wrong)


if __name__ == "__main__":  # python -m tests.training.test_same_numbers --write|--check [names...]
    import tempfile

    if sys.argv[1:2] not in (["--write"], ["--check"]):
        sys.exit("usage: python -m tests.training.test_same_numbers --write|--check [run names]\n"
                 "  --write records the runs; --check compares them with the record bit for bit")
    names = sys.argv[2:] or sorted(RUNS)
    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    different = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows = run(name, Path(tmp) / name)
            if sys.argv[1] == "--write":
                record[name] = rows
                print(name, [row["loss"] for row in rows])
                continue
            diffs = [(row["step"], key, want[key], row.get(key)) for row, want in zip(rows, record[name])
                     for key in want if row.get(key) != want[key]]
            if len(rows) != len(record[name]) or diffs:
                different.append(name)
            print(name, "bit for bit" if name not in different else f"differs: {diffs[:5]}", flush=True)
    if sys.argv[1] == "--write":
        RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    sys.exit(1 if different else 0)
