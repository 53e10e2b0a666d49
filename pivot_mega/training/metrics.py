"""What rank 0 shows and records: a progress bar, ``OUT/metrics.jsonl``, TensorBoard events, W&B
(``train.wandb``, the same names), and every ``log_every`` steps a throughput line (tokens/s/device,
TFLOP/s/device, MFU, peak memory, data wait).

``metrics.jsonl`` holds one JSON object per step: ``step``, ``time`` (seconds since the run started),
the step's metrics (``loss``, ``grad_norm``, ``lr``, DPO's ``rewards/*`` ...) and, on logging steps,
the interval's throughput under ``perf/``; the online probes' results (``eval.probe``) are records of
their own: ``step``, ``time`` and ``probe/...``, no ``loss`` (``step_records`` / ``probe_records``
split them). A resumed run first drops the lines of steps after its
checkpoint, so the file reads as one run. A crash or a full disk can leave a torn last line; readers drop it
with a warning (a bad line anywhere else is an error), and the resume-time rewrite is atomic.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

from ..config import ConfigError
from ..profiling import ThroughputMeter
from .checkpoint.ranks import write_text_atomic
from .config import WandbConfig, import_wandb

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsFileError(ValueError):
    """A line of ``metrics.jsonl`` other than the last is not a JSON object."""


def read_metrics(out_dir: str | os.PathLike) -> list[dict]:
    """A run's ``metrics.jsonl`` records, read as :func:`read_metrics_lines` reads them."""
    return [record for _, record in read_metrics_lines(Path(out_dir) / METRICS_FILE)]


def step_records(records: list[dict]) -> list[dict]:
    """The training steps' records (those with a ``loss``), without the online probes' records."""
    return [record for record in records if "loss" in record]


def probe_records(records: list[dict]) -> list[dict]:
    """The online probes' records (``step``, ``probe/<features>/<probe>/top1``..., ``probe/time_s``)."""
    return [record for record in records if "probe/time_s" in record]


def read_metrics_lines(path: Path) -> list[tuple[str, dict]]:
    """The file's ``(line, record)`` pairs, blank lines skipped. A torn last line (one that does not parse:
    the write of a crashed or disk-full run) is dropped with a warning; a bad line before it raises."""
    text = Path(path).read_text()
    lines = text.splitlines()
    last = max((number for number, line in enumerate(lines, start=1) if line.strip()), default=0)
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if number == last:
                log.warning("metrics: dropped a torn last line of %s (%d bytes)", path, len(line.encode()))
                break
            raise MetricsFileError(f"{path}: line {number} is not a JSON object ({e}); fix or delete the line")
        pairs.append((line, record))
    return pairs


def drop_torn_tail(path: Path) -> None:
    """Cuts a last line without its newline that does not parse, so an append starts on a line of its own (a
    complete last line that only lacks the newline gets one)."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        start, tail = size, b""
        while start > 0 and b"\n" not in tail:  # read back to the last newline, a block at a time
            step = min(start, 1 << 16)
            start -= step
            f.seek(start)
            tail = f.read(step) + tail
        if not tail or tail.endswith(b"\n"):
            return
        fragment = tail[tail.rfind(b"\n") + 1:]
        try:
            complete = isinstance(json.loads(fragment), dict)
        except ValueError:
            complete = False
        if complete:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            return
        log.warning("metrics: dropped a torn last line of %s (%d bytes)", path, len(fragment))
        f.truncate(size - len(fragment))


def host_peak_memory_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def scalars(record: dict) -> dict:
    """The record's numbers other than ``step``: what TensorBoard and W&B plot."""
    return {key: value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class MetricsLogger:
    """Does nothing on ranks other than 0 (``enabled=False``).

    With ``wandb`` enabled, rank 0 logs to a W&B run whose config is ``run_config``; ``wandb_run_id`` (from
    the checkpoint a run resumes) continues that run, and the property of that name is the id to save with
    the next checkpoint (None without W&B)."""

    def __init__(self, out_dir: Path, *, enabled: bool, total_steps: int, start_step: int, progress: bool,
                 tensorboard: bool, log_every: int, stage: str, num_devices: int, peak_tflops: float | None,
                 wandb: WandbConfig | None = None, run_config: dict | None = None, wandb_run_id: str | None = None):
        self.enabled, self.log_every, self.stage = enabled, log_every, stage
        self.path = Path(out_dir) / METRICS_FILE
        self.interval = ThroughputMeter(num_devices, peak_tflops)
        self.whole_run = ThroughputMeter(num_devices, peak_tflops)
        self.start = time.perf_counter()
        self.steps_run = 0
        self._file = self._bar = self._writer = self._wandb_run = None
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=start_step + 1)
        if wandb is not None and wandb.enabled:
            self._wandb_run = start_wandb_run(wandb, Path(out_dir), run_config or {}, wandb_run_id)
        self._interactive = progress and sys.stderr.isatty()
        if self._interactive:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc=stage, unit="step", dynamic_ncols=True,
                             file=sys.stderr)
        self._total_steps = total_steps

    @property
    def wandb_run_id(self) -> str | None:
        return None if self._wandb_run is None else self._wandb_run.id

    def truncate_after(self, step: int) -> None:
        """Keeps the lines of steps <= ``step`` (a resumed run redoes the others)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line, record in read_metrics_lines(self.path) if record.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def add_step(self, tokens: int, flops: float, data_wait_s: float) -> None:
        self.interval.add_step(tokens, flops, data_wait_s)
        self.whole_run.add_step(tokens, flops, data_wait_s)
        self.steps_run += 1

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.perf_counter() - self.start, 3), **metrics}
        if step % self.log_every == 0:
            perf = self.interval.summary()
            perf["host_peak_memory_gb"] = host_peak_memory_gb()
            self.interval.reset()
            record.update({f"perf/{k}": v for k, v in perf.items()})
            self._print(step, metrics, perf)
        self._write(step, record)
        if self._bar is not None:
            postfix = {"loss": f"{metrics['loss']:.4f}"}
            if "rewards/accuracies" in metrics:
                postfix["acc"] = f"{metrics['rewards/accuracies']:.3f}"
            postfix["tok/s"] = f"{metrics['tokens'] / max(record['time'] / max(self.steps_run, 1), 1e-9):.0f}"
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)

    def _write(self, step: int, record: dict, plotted: dict | None = None) -> None:
        """One record: a line of ``metrics.jsonl``; the numbers of ``plotted`` (default: the record) to
        TensorBoard and W&B at ``step``."""
        if self._file is None:
            drop_torn_tail(self.path)
            self._file = self.path.open("a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = scalars(record if plotted is None else plotted)
        if self._writer is not None:
            for key, value in numbers.items():
                self._writer.add_scalar(key, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(numbers, step=step)

    def log_probe(self, step: int, results: dict) -> None:
        """An online probe's results: a record of its own in ``metrics.jsonl`` (``step``, ``probe/...``;
        no ``loss``), TensorBoard scalars at ``step`` and one printed line."""
        if not self.enabled or not results:
            return
        # Plotted without its time: W&B joins it to its step's row, whose time is the step's.
        self._write(step, {"step": step, "time": round(time.perf_counter() - self.start, 3), **results}, results)
        shown = " | ".join(f"{key.removeprefix('probe/').removesuffix('/top1')} {value:.1f}%"
                           for key, value in results.items() if key.endswith("/top1"))
        line = f"probe at step {step} | {shown} | {results.get('probe/time_s', 0):.1f} s"
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def exclude_time(self, seconds: float) -> None:
        """Leaves ``seconds`` (an online probe) out of the throughput figures."""
        self.interval.exclude(seconds)
        self.whole_run.exclude(seconds)

    def _print(self, step: int, metrics: dict, perf: dict) -> None:
        parts = [f"step {step}", f"loss {metrics['loss']:.4f}"]
        if "rewards/accuracies" in metrics:
            parts += [f"reward acc {metrics['rewards/accuracies']:.3f}", f"margin {metrics['rewards/margins']:.4f}"]
        parts += [f"grad norm {metrics['grad_norm']:.3g}", f"lr {metrics['lr']:.3g}",
                  f"{perf['tokens_per_s_per_device']:.0f} tok/s/device",
                  f"{perf['tflops_per_device']:.3g} TFLOP/s/device",
                  "MFU n/a" if perf["mfu"] is None else f"MFU {100 * perf['mfu']:.1f}%",
                  f"data wait {100 * perf['data_wait_fraction']:.1f}%"]
        if perf.get("peak_memory_gb") is not None:
            parts.append(f"GPU peak {perf['peak_memory_gb']:.1f} GB")
        parts.append(f"host peak {perf['host_peak_memory_gb']:.1f} GB")
        line = " | ".join(parts)
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def summary(self) -> dict:
        """Throughput over the whole run (steps of this process)."""
        perf = self.whole_run.summary()
        perf["host_peak_memory_gb"] = host_peak_memory_gb()
        perf["steps"] = self.steps_run
        return perf

    def print_summary(self) -> None:
        if not self.enabled or not self.steps_run:
            return
        perf = self.summary()
        mfu = "n/a (unknown device peak)" if perf["mfu"] is None else f"{100 * perf['mfu']:.1f}%"
        memory = f", GPU peak {perf['peak_memory_gb']:.1f} GB" if perf.get("peak_memory_gb") is not None else ""
        print(f"throughput over {perf['steps']} steps: {perf['tokens_per_s']:.0f} tokens/s "
              f"({perf['tokens_per_s_per_device']:.0f} per device), {perf['tflops_per_device']:.3g} TFLOP/s per "
              f"device, MFU {mfu}, data wait {100 * perf['data_wait_fraction']:.1f}%{memory}, host peak "
              f"{perf['host_peak_memory_gb']:.1f} GB", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def start_wandb_run(config: WandbConfig, out_dir: Path, run_config: dict, run_id: str | None):
    """``wandb.init`` for rank 0; ``run_id`` continues that run (``resume="allow"``: a fresh one if W&B has
    none of that id, e.g. an offline run never synced)."""
    wandb = import_wandb()
    directory = Path(config.dir or out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return wandb.init(project=config.project, entity=config.entity or None, name=config.name or None,
                          mode=config.mode, dir=str(directory), config=run_config, id=run_id, resume="allow")
    except wandb.errors.Error as e:  # no login, a bad entity, no network with mode online ...
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"train.wandb: wandb.init failed: {first_line} (mode {config.mode!r})") from e
