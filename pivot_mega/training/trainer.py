"""``pivot-mega train``: one PIVOT stage end to end, in one process or on every rank of a job.

    config = load_run_config("examples/configs/train_dpo.yaml", ["train.max_steps=100"])
    summary = Trainer(config).run()

The story of a run: build the mesh from torchrun / srun / nothing → the model on the meta device →
parallelize (TP/SP, PP, FSDP) → weights from ``init_from`` → freeze the towers the stage does not
train → AdamW, warmup + cosine → resume from the latest checkpoint → steps until the epochs or
``max_steps`` are done → final checkpoint, portable export (``OUT/final``), HF export if asked.

A step takes the loader's micro-batches until the global batch holds ``global_batch_size`` samples
(pairs for DPO); every rank runs the same loader plan, so every rank takes the same number of
micro-batches and knows the global counts without communication. One all-reduce per step gathers
the metrics, the stop flag (SIGTERM / SIGUSR1 on any rank) and the non-finite check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..batch import MicroBatch
from ..config import ConfigError
from ..data.loader import BAD_IMAGE, PackedDataLoader
from ..data.sources import DataError
from ..data.tokenizer import check_image_token_id, copy_tokenizer_files
from ..models.checkpoint_files import CheckpointError, read_config, read_safetensors_dir
from ..models.mllm import VisionLanguageModel
from ..parallel import ParallelModel, build_mesh, parallelize
from ..precision import apply_precision, check_precision, precision_autocast
from ..profiling import StepProfiler, nvtx_range, peak_tflops
from .checkpoint.dcp import (LoadedCheckpoint, PendingSave, async_save_group, load_checkpoint, resolve_resume,
                             save_checkpoint)
from .checkpoint.portable import NonFiniteWeightsError, export_model, load_model_weights
from .config import RunConfig, check_run_paths
from .losses import RunningRewardMean, dpo_metric_names
from .metrics import MetricsLogger
from .online_probe import OnlineProbe
from .optim import apply_trainable, build_optimizer, build_scheduler, clip_grad_norm_, tied_embedding_copies
from .reference import build_reference
from .run_lock import RunLock
from ..signals import RunStopped, StopSignals
from .steps import DATA_METRICS, StepResult, StepRunner

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps, a reference that does not fit...)."""


@dataclasses.dataclass
class RunSummary:
    steps: int
    stopped_by: str | None
    out_dir: str
    final: str | None
    last_metrics: dict


class Trainer:
    def __init__(self, config: RunConfig):
        self.config = config
        self.out_dir = Path(config.train.out_dir)
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self._warned_batch = False

    # ------------------------------------------------------------------------------------------
    # setup

    def _model_config(self):
        c = self.config
        if c.model is not None:
            return c.model
        init = Path(c.init_from)
        if (init / "checkpoint.json").is_file():
            saved = json.loads((init / "config.json").read_text()) if (init / "config.json").is_file() else {}
            if not saved.get("model"):
                raise ConfigError(f"init_from {init}: a training checkpoint without its run config; give a model section")
            from ..config import ModelConfig, from_dict
            return from_dict(ModelConfig, saved["model"], where=f"{init}/config.json: model").validate()
        return read_config(init)

    def _build_model(self, model_config, dims, *, init_from: str, seed: int) -> ParallelModel:
        with torch.device("meta"):
            model = VisionLanguageModel(model_config)
        apply_precision(model, self.config.precision)
        pmodel = parallelize(model, dims, seed=None if init_from else seed)
        if init_from:
            path = Path(init_from)
            if (path / "checkpoint.json").is_file():
                load_checkpoint(path, pmodel=pmodel, restore_rng=False)
            else:
                load_model_weights(pmodel, path)
        return pmodel

    def _autocast(self, dims):
        bf16 = self.config.parallel.mixed_precision == "bf16" and dims.layout.dp == 1 and self.device_type == "cuda"
        precision = self.config.precision
        amax_group = None
        if precision.backend == "te" and dims.layout.dp > 1:
            # FP8 scales agree over the data-parallel ranks, which hold the same modules (TE runs without TP;
            # pipeline stages hold different ones, so never the whole world).
            dp_mesh = dims.mesh["dp_replicate", "dp_shard"]._flatten("dp_amax")
            amax_group = dp_mesh.get_group()

        @contextlib.contextmanager
        def context():
            with contextlib.ExitStack() as stack:
                if bf16:  # without FSDP nothing casts parameters; autocast does it per op
                    stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
                stack.enter_context(precision_autocast(precision, amax_group=amax_group))
                yield
        return context

    # ------------------------------------------------------------------------------------------
    # the run

    def run(self) -> RunSummary:
        # The stop signals first: one during start-up or the reference pass stops the run cleanly too.
        signals = StopSignals().install()
        self._lock = None
        try:
            return self._run(signals)
        finally:
            signals.restore()
            if self._lock is not None:
                self._lock.release()

    def _take_lock(self, is_main: bool) -> None:
        """Rank 0 locks ``out_dir`` for this run; a refusal is raised on every rank."""
        error = None
        if is_main:
            try:
                self._lock = RunLock(self.out_dir).acquire()
            except ConfigError as e:
                error = str(e)
        box = [error]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise ConfigError(box[0])

    def _run(self, signals: StopSignals) -> RunSummary:
        c = self.config
        check_run_paths(c)
        check_precision(c.precision, self.device_type,
                        tensor_parallel_size=c.parallel.tensor_model_parallel_size)
        model_config = self._model_config()
        check_image_token_id(c.data.tokenizer, model_config.image_token_id)
        c.model = model_config  # saved with every checkpoint: the run is self-describing
        pp = c.parallel.pipeline_model_parallel_size
        if pp > 1 and c.parallel.microbatches < pp:
            # A step's micro-batch count comes from the data; parallel.microbatches is its minimum.
            log.info("train: parallel.microbatches %d -> %d: a pipeline step needs at least one micro-batch "
                     "per stage", c.parallel.microbatches, pp)
            c.parallel.microbatches = pp
        dims = build_mesh(c.parallel, model_config, self.device_type)
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(c.train.seed)
        is_main = rank == 0
        self._take_lock(is_main)
        log.info("train: stage %s on %d rank(s): %s", c.stage, world, dims.layout)

        trainable = tuple(c.trainable)
        pmodel = self._build_model(model_config, dims, init_from=c.init_from, seed=c.train.seed)
        apply_trainable(pmodel, trainable)
        pmodel.train()
        optimizer = build_optimizer(pmodel.named_parameters(), c.optim, self.device_type)

        device_id = torch.cuda.current_device() if self.device_type == "cuda" else None
        loader = PackedDataLoader(c.data, image_size=model_config.vision.image_size,
                                  num_image_tokens=model_config.num_image_tokens,
                                  image_token_id=model_config.image_token_id, rank=dims.dp_rank,
                                  world_size=dims.layout.dp, device_id=device_id, pin_memory_device=device_id)
        total_steps = c.train.max_steps or max(1, math.ceil(c.train.epochs * len(loader.shards)
                                                            / c.train.global_batch_size))
        scheduler = build_scheduler(optimizer, c.optim, total_steps)
        device = next(iter(pmodel.parameters())).device
        reward_mean = RunningRewardMean(all_reduce=dist.all_reduce, device=device)
        autocast = self._autocast(dims)

        step, trainer_state = 0, {"bad_steps_in_a_row": 0, "bad_steps": 0, "samples": 0, "tokens": 0}
        wandb_run_id = None  # the W&B run that a resumed run continues (train.wandb)
        resume = resolve_resume(self.out_dir, c.train.resume, fallback=c.train.resume_fallback)
        if resume is not None:
            loaded = load_checkpoint(resume, pmodel=pmodel, optimizer=optimizer, scheduler=scheduler, verify=False)
            step = loaded.step
            extra = self._extra_state(loaded)
            loader.load_state_dict(extra["data"], allow_new_world_size=True)
            reward_mean.load_state_dict(extra["reward_mean"])
            trainer_state.update(extra["trainer"])
            wandb_run_id = extra.get("wandb_run_id")  # None: saved without W&B
            log.info("train: resumed from %s at step %d%s", resume, step,
                     "" if loaded.rng_restored else " (new world size: RNG streams start afresh)")

        reference = None
        if c.stage == "dpo":
            try:
                reference = build_reference(c, dims, loader, lambda source: self._build_model(
                    model_config, dims, init_from=source, seed=c.train.seed), autocast, self.device_type,
                    should_stop=lambda: signals.any_rank_stopping(device))
            except RunStopped as e:
                loader.close()
                if is_main:
                    print(f"pivot-mega train: stopped by {e.signal_name} {e}", file=sys.stderr, flush=True)
                return RunSummary(step, e.signal_name, str(self.out_dir), None, {})

        runner = StepRunner(c.stage, pmodel, model_config, trainable=trainable, dpo=c.dpo, reference=reference,
                            reward_mean=reward_mean, autocast=autocast)
        name = torch.cuda.get_device_name() if self.device_type == "cuda" else "cpu"
        dtype = "fp8" if c.precision.fp8 != "none" else ("bf16" if c.parallel.mixed_precision == "bf16" else "fp32")
        logger = MetricsLogger(self.out_dir, enabled=is_main, total_steps=total_steps, start_step=step,
                               progress=c.train.progress, tensorboard=c.train.tensorboard, log_every=c.train.log_every,
                               stage=c.stage, num_devices=world, peak_tflops=peak_tflops(name, dtype),
                               wandb=c.train.wandb, run_config=c.to_dict(), wandb_run_id=wandb_run_id)
        if is_main:
            logger.truncate_after(step)
            (self.out_dir / "config.json").write_text(json.dumps(c.to_dict(), indent=2) + "\n")
        probe = None
        if c.eval.probe.enabled:
            probe = OnlineProbe(c.eval.probe, model_config, total_steps=total_steps, seed=c.train.seed,
                                device=device, is_main=is_main)
        profiler = StepProfiler(c.profile, self.out_dir, self.device_type, rank=rank)
        tp, pp = dims.layout.tp, dims.layout.pp
        tied = tied_embedding_copies(pmodel)
        pending: PendingSave | None = None
        async_group = async_save_group(c.parallel.timeout_s) if c.train.async_save else None  # one for every save of the run
        saved_step = step if resume is not None else None
        metrics, extra = {}, None
        stopped_by = signals.any_rank_stopping(device)  # a signal during start-up: no step is begun
        batches_iter = iter(loader)
        exhausted = False
        probed_step = step if resume is not None else None  # a resumed run probed its start step already
        try:
            if probe is not None and probed_step is None and stopped_by is None:
                probed_step = self._probe(probe, pmodel, step, logger)
            while step < total_steps and not exhausted and stopped_by is None:
                profiler.step_begin(step + 1)
                wait_start = time.perf_counter()
                with profiler.range("data"):
                    batches, data_state, exhausted = self._take_step(batches_iter, loader, dims)
                data_wait = time.perf_counter() - wait_start
                if not batches:
                    break
                step += 1
                with profiler.range("forward_backward"):
                    result = runner.run(batches)
                # One all-reduce: the metric sums and the stop flag of every rank.
                names = runner.metric_names
                flag = torch.tensor(float(signals.received is not None), dtype=torch.float64, device=device)
                bad_images = torch.tensor(float(loader.counters.skipped[BAD_IMAGE]), dtype=torch.float64,
                                          device=device)
                vector = torch.stack([result.sums[n] for n in names] + [bad_images, flag])
                with profiler.range("metrics_all_reduce"):
                    dist.all_reduce(vector)
                values = {n: v / ((tp * pp) if n in DATA_METRICS else tp)
                          for n, v in zip(names, vector[:-2].tolist())}
                stop_requested = vector[-1].item() > 0
                skipped = self._skipped(loader, round(vector[-2].item() / (tp * pp)))
                count = self._trained_count(result, values, pmodel)
                loss = values["loss_sum"] / max(count, 1)
                with profiler.range("clip_grad_norm"):  # all-reduces of the squared norms
                    norm = clip_grad_norm_(pmodel.parameters(), c.optim.max_grad_norm,
                                           pp_group=dims.pp_group if pp > 1 else None, tied_copies=tied)
                finite = math.isfinite(loss) and bool(torch.isfinite(norm))
                lr = scheduler.get_last_lr()[0]  # this step's
                with profiler.range("optimizer"):
                    if finite:
                        optimizer.step()
                        reward_mean.step()
                        trainer_state["bad_steps_in_a_row"] = 0
                    else:
                        reward_mean.discard()
                        trainer_state["bad_steps"] += 1
                        trainer_state["bad_steps_in_a_row"] += 1
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                trainer_state["samples"] += round(values["samples"])  # trained: a broken image's sample left out
                trainer_state["tokens"] += int(values["tokens"])
                logger.add_step(int(values["tokens"]), values["flops"], data_wait)
                metrics = self._step_metrics(values, loss, result, norm, lr, trainer_state, finite,
                                             len(batches), batches[-1].epoch)
                metrics.update(skipped)
                logger.log(step, metrics)
                self._check_skipped(loader, skipped)
                profiler.step_end(step)
                if not finite:
                    log.warning("train: step %d skipped: loss %s, grad norm %s (%d in a row, %d in all)", step, loss,
                                float(norm), trainer_state["bad_steps_in_a_row"], trainer_state["bad_steps"])
                    if trainer_state["bad_steps_in_a_row"] >= c.train.max_bad_steps:
                        raise TrainingError(f"{trainer_state['bad_steps_in_a_row']} steps in a row had a non-finite "
                                            f"loss or gradient norm (train.max_bad_steps={c.train.max_bad_steps}); "
                                            f"last loss {loss}, grad norm {float(norm)}. Lower optim.lr, check "
                                            f"the data, or resume from an earlier checkpoint")
                if probe is not None and probe.due(step):
                    probed_step = self._probe(probe, pmodel, step, logger)
                extra = {"data": data_state, "reward_mean": reward_mean.state_dict(), "trainer": dict(trainer_state),
                         "wandb_run_id": logger.wandb_run_id}
                if stop_requested or (c.train.save_every and step % c.train.save_every == 0):
                    pending = self._save(pending, step, pmodel, optimizer, scheduler, extra, async_group)
                    saved_step = step
                if stop_requested:
                    stopped_by = signals.received or signals.OTHER_RANK
                    break
            if probe is not None and stopped_by is None and probed_step != step:  # the data ended first
                probed_step = self._probe(probe, pmodel, step, logger)
            if stopped_by is None and extra is not None and saved_step != step:
                pending = self._save(pending, step, pmodel, optimizer, scheduler, extra, async_group)
            if pending is not None:
                pending.wait()
            final = None
            if stopped_by is None:
                skipped = trainer_state["bad_steps_in_a_row"]
                if skipped:  # the same on every rank: the non-finite check is all-reduced
                    raise TrainingError(f"the last {skipped} step(s) of the run had a non-finite loss or gradient "
                                        f"norm and were skipped: the weights were not updated by them; no final "
                                        f"export. Lower optim.lr, check the data, or resume from an earlier "
                                        f"checkpoint")
                final = self._export(pmodel)
        finally:
            if pending is not None:  # after an error: the background write ends before its group does
                pending.close()
            if async_group is not None:
                dist.destroy_process_group(async_group)
            profiler.close()
            loader.close()
            logger.close()
        if stopped_by is not None and is_main:
            where = (f"checkpoint {pending.path}" if pending is not None and saved_step == step else
                     f"nothing new to save (checkpoint {resume})" if resume is not None else "nothing to save")
            print(f"pivot-mega train: stopped by {stopped_by} after step {step}; {where}. Resume with "
                  f"train.resume=auto", file=sys.stderr, flush=True)
        logger.print_summary()
        return RunSummary(step, stopped_by, str(self.out_dir), None if final is None else str(final), metrics)

    # ------------------------------------------------------------------------------------------
    # pieces of the loop

    def _trained_count(self, result: StepResult, values: dict, pmodel: ParallelModel) -> int:
        """The pairs (DPO) or label tokens the step trained on, over all ranks, from its all-reduced data
        metrics; the gradients rescaled to it where it is fewer than planned.

        The losses are normalised by the step's planned count, which every rank knows without a
        collective. A sample whose image does not decode leaves only its own rank's micro-batch, so
        then the step trained on fewer: the gradients (linear in the normaliser) are multiplied by
        planned / trained, and the loss divided by the trained count, as if the sample had never been
        planned."""
        trained = round(values["samples"] if self.config.stage == "dpo" else values["label_tokens_data"])
        planned = result.global_count
        if trained > planned:
            raise TrainingError(f"internal: the step trained on {trained} {self._count_unit()}, more than the "
                                f"{planned} its plan holds")
        if 0 < trained < planned:
            for param in pmodel.parameters():  # one by one: foreach ops refuse TP's mix of DTensor and plain
                if param.grad is not None:
                    param.grad.mul_(planned / trained)
            log.debug("train: step normalised over %d %s, not the %d planned (samples left out for broken "
                      "images)", trained, self._count_unit(), planned)
        return trained

    def _count_unit(self) -> str:
        return "pairs" if self.config.stage == "dpo" else "label tokens"

    def _take_step(self, batches_iter, loader: PackedDataLoader, dims) -> tuple[list[MicroBatch], dict, bool]:
        """Micro-batches of one step, the loader state after the last of them, whether the data ran out.

        A pipeline needs at least ``pp`` (and ``parallel.microbatches``) micro-batches per step, a whole
        number of ``pp`` with the interleaved schedule; the last step of the run is filled with blank
        micro-batches (no labels, no samples) when the data ends first."""
        c, pp = self.config, dims.layout.pp
        minimum = max(pp, c.parallel.microbatches) if pp > 1 else 1
        multiple = pp if pp > 1 and c.parallel.pipeline_schedule == "interleaved_1f1b" else 1
        batches, samples, state, exhausted = [], 0, None, False
        while True:
            batch = next(batches_iter)
            if batch.epoch >= c.train.epochs:
                exhausted = True
                break
            batches.append(batch)
            state = loader.state_dict()
            samples += batch.global_samples
            if len(batches) == 1 and batch.global_samples > c.train.global_batch_size and not self._warned_batch:
                self._said_batch_size(batch.global_samples)
            if samples >= c.train.global_batch_size and len(batches) >= minimum and len(batches) % multiple == 0:
                break
        if batches and pp > 1:
            while len(batches) < minimum or len(batches) % multiple:
                batches.append(batches[-1].blank())
        return batches, state, exhausted

    def _said_batch_size(self, micro_batch_samples: int) -> None:
        """Says, once, that one micro-batch already holds more than ``train.global_batch_size`` samples:
        a step trains at least one, so more than asked; a warning when it is twice as many or more."""
        c = self.config
        self._warned_batch = True
        level = logging.WARNING if micro_batch_samples >= 2 * c.train.global_batch_size else logging.INFO
        log.log(level, "train: train.global_batch_size=%d is smaller than one micro-batch, which holds %d samples "
                       "over the data-parallel ranks (data.micro_batch_rows=%d rows of %d tokens): each step trains "
                       "at least one micro-batch, more samples than asked (logged as 'samples'); lower "
                       "data.micro_batch_rows or raise train.global_batch_size to match", c.train.global_batch_size,
                micro_batch_samples, c.data.micro_batch_rows, c.data.max_seq_len)

    def _step_metrics(self, values: dict, loss: float, result, norm, lr: float, state: dict, finite: bool,
                      micro_batches: int, epoch: int) -> dict:
        out = {"loss": loss, "grad_norm": float(norm), "lr": lr, "epoch": epoch,
               "samples": round(values["samples"]), "micro_batches": micro_batches,
               "tokens": int(values["tokens"]), "padding_fraction":
                   values["padding_tokens"] / max(values["tokens"] + values["padding_tokens"], 1),
               "skipped": not finite, "bad_steps": state["bad_steps"]}
        if self.config.stage == "dpo":
            pairs = max(values["pairs"], 1)
            for name in dpo_metric_names(self.config.dpo, logged=True):
                out[name] = values[name] / pairs
        return out

    @staticmethod
    def _probe(probe: OnlineProbe, pmodel, step: int, logger: MetricsLogger) -> int:
        """The online probe at ``step`` (all ranks), logged apart from the step and its time left out of
        the throughput; → ``step``."""
        started = time.perf_counter()
        with nvtx_range("online_probe"):
            results = probe.run(pmodel, step)
        logger.log_probe(step, results)
        logger.exclude_time(time.perf_counter() - started)
        return step

    @staticmethod
    def _skipped(loader: PackedDataLoader, bad_images: int) -> dict:
        """Samples skipped so far in the run, all ranks', by reason: ``data/skipped`` and
        ``data/skipped/<reason>`` (bad images summed over the data-parallel ranks that decode them; every
        other reason is found by every rank reading the same sidecars)."""
        by_reason = {reason: count for reason, count in loader.counters.skipped.items() if reason != BAD_IMAGE}
        if bad_images:
            by_reason[BAD_IMAGE] = bad_images
        out = {"data/skipped": sum(by_reason.values())}
        out.update({f"data/skipped/{reason}": count for reason, count in sorted(by_reason.items())})
        return out

    def _check_skipped(self, loader: PackedDataLoader, skipped: dict) -> None:
        """Stops a run losing its data: more than ``data.max_skipped_fraction`` of the samples read so far
        skipped, once 100 have been read (the same answer on every rank)."""
        read, lost = loader.counters.samples_read, skipped["data/skipped"]
        limit = self.config.data.max_skipped_fraction
        if read >= 100 and lost > limit * read:
            reasons = {key.removeprefix("data/skipped/"): count for key, count in skipped.items() if key != "data/skipped"}
            raise DataError(f"{self.config.data.shards}: {lost} of the {read} samples read so far were skipped "
                            f"({100 * lost / read:.1f} %, above data.max_skipped_fraction={limit}): {reasons}. The "
                            f"warnings above name the first ones; fix or rebuild the shards, or raise the limit")

    def _save(self, pending, step, pmodel, optimizer, scheduler, extra, async_group) -> PendingSave:
        if pending is not None:
            pending.wait()
        with nvtx_range("checkpoint"):
            saved = save_checkpoint(self.out_dir, step=step, pmodel=pmodel, optimizer=optimizer, scheduler=scheduler,
                                    extra_state=extra, config_dict=self.config.to_dict(),
                                    keep_last=self.config.train.keep_last, async_save=self.config.train.async_save,
                                    async_group=async_group)
        if not self.config.train.async_save:
            saved.wait()
        return saved

    def _extra_state(self, loaded: LoadedCheckpoint) -> dict:
        extra = loaded.extra_state
        if extra is None:  # the saving run had fewer ranks: positions are the same on every rank
            extra = json.loads((loaded.directory / "rank_state" / "rank_00000.json").read_text())
        missing = sorted({"data", "reward_mean", "trainer"} - set(extra))
        if missing:
            raise CheckpointError(f"{loaded.directory}: rank state lacks {missing}; not written by pivot-mega train")
        return extra

    def _export(self, pmodel) -> Path:
        c = self.config
        final = self.out_dir / "final"
        unused = {}
        if c.init_from and dist.get_rank() == 0:
            init = Path(c.init_from)
            if (init / "vision_unused.safetensors").is_file():
                unused = read_safetensors_dir(init, stem="vision_unused")
        with nvtx_range("export"):
            try:
                export_model(pmodel, final, unused_vision=unused or None)
            except NonFiniteWeightsError as e:  # the run's outcome, not a checkpoint fault: one line at the CLI
                raise TrainingError(str(e)) from e
        if dist.get_rank() == 0:
            copy_tokenizer_files(c.data.tokenizer, final)
            if c.train.export_hf:
                from ..convert.hf import export_hf
                export_hf(final, self.out_dir / "hf" / "llava", format="llava")
                export_hf(final, self.out_dir / "hf" / "siglip", format="siglip")
                log.info("train: HF exports in %s", self.out_dir / "hf")
        dist.barrier()
        return final
