"""DPO's reference log-probs, in one place: online (a frozen copy of the initial model), precomputed
(read from a JSON file), and the pass that precomputes them.

    reference = build_reference(config, dims, loader, build_model, autocast, "cuda")
    logps = reference.logps(microbatches, autocast)     # per micro-batch: fp32 [num_sequences]

Per micro-batch, sequence 2p / 2p + 1 is the chosen / rejected response of the micro-batch's pair p
(``MicroBatch.targets.sequence``); the step attaches these to the micro-batches
(``MicroBatch.reference_logps``) before the policy's forward.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..batch import MicroBatch
from ..data.loader import PackedDataLoader
from ..parallel import ParallelModel, token_logprobs
from ..profiling import nvtx_range
from .config import RunConfig
from .losses import sequence_logprob_sums
from ..signals import RunStopped

log = logging.getLogger(__name__)


class ReferenceError(ValueError):
    """Reference log-probs are missing for some pairs, or the reference file does not fit the data."""


def sequence_sums(hidden: torch.Tensor, head_weight: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """Output function for ``forward_only``: the micro-batch's per-sequence log-prob sums (fp32)."""
    logprobs = token_logprobs(hidden, head_weight, mb.targets).float()
    sums, _ = sequence_logprob_sums(logprobs, mb.targets.sequence, mb.targets.num_sequences)
    return sums


class OnlineReference:
    """A frozen model whose forward gives the reference log-probs of every step's pairs."""

    def __init__(self, model: ParallelModel):
        self.model = model
        for param in model.parameters():
            param.requires_grad_(False)
        model.train(False)

    def logps(self, microbatches: list[MicroBatch], autocast=contextlib.nullcontext) -> list[torch.Tensor | None]:
        """→ per micro-batch ``[num_sequences]`` sums where this rank computes losses, None elsewhere."""
        with autocast(), nvtx_range("reference_forward"):
            outputs = self.model.forward_only(microbatches, sequence_sums).outputs
        return outputs if outputs else [None] * len(microbatches)


class PrecomputedReference:
    """Reference log-prob sums per pair id: ``pairs`` maps a pair id to [chosen sum, rejected sum];
    ``source`` names where they came from (the file, in errors)."""

    FORMAT = "pivot_mega.reference_logps"

    def __init__(self, pairs: dict[str, list[float]], source: str):
        self.pairs, self.source = pairs, source

    @classmethod
    def read(cls, path: str | os.PathLike, shards_fingerprint: str | None = None) -> "PrecomputedReference":
        """The JSON file ``precompute_reference_logps`` writes, checked against the shards."""
        path = Path(path)
        if not path.is_file():
            raise ReferenceError(f"{path}: no reference log-probs; run with --set dpo.precompute_reference=true "
                                 f"to write them, or use dpo.reference=online")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ReferenceError(f"{path}: cannot read reference log-probs ({e})") from e
        if data.get("format") != cls.FORMAT:
            raise ReferenceError(f"{path}: not a reference log-prob file (format {data.get('format')!r})")
        if shards_fingerprint is not None and data.get("shards") != shards_fingerprint:
            raise ReferenceError(f"{path}: written for other shards ({data.get('shards_dir')}); "
                                 f"precompute the reference log-probs for this data again")
        return cls(data["pairs"], str(path))

    def lookup(self, ids: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """→ ``[2P]``: chosen and rejected sums of each pair, interleaved."""
        missing = [i for i in ids if i not in self.pairs]
        if missing:
            raise ReferenceError(f"{self.source}: no reference log-probs for {len(missing)} pair(s): {missing[:10]}"
                                 f"{' ...' if len(missing) > 10 else ''}; precompute them for this data again")
        values = [v for i in ids for v in self.pairs[i]]
        return torch.tensor(values, dtype=torch.float32, device=device)

    def logps(self, microbatches: list[MicroBatch], autocast=None) -> list[torch.Tensor]:
        """→ per micro-batch ``[num_sequences]`` sums, from the file."""
        return [self.lookup(mb.pair_ids, mb.input_ids.device) for mb in microbatches]


def build_reference(config: RunConfig, dims, loader: PackedDataLoader, build_model, autocast,
                    device_type: str, should_stop=None) -> OnlineReference | PrecomputedReference:
    """The reference a DPO run asks for. ``build_model(init_from)`` builds a ParallelModel like the
    policy's; with ``dpo.precompute_reference`` the file is written first unless it already fits.
    ``should_stop()``: see ``precompute_reference_logps``."""
    dpo, path = config.dpo, config.reference_logps_path
    fingerprint = loader.shards.fingerprint
    if not dpo.precompute_reference:
        if dpo.reference == "precomputed":
            return PrecomputedReference.read(path, fingerprint)
        return OnlineReference(build_model(dpo.reference_from or config.init_from))
    if dpo.reference == "online":
        log.info("train: dpo.precompute_reference is set, so the reference log-probs are precomputed and read "
                 "from %s (dpo.reference 'online' does not apply)", path)
    try:
        existing = PrecomputedReference.read(path, fingerprint)
        log.info("train: reference log-probs already in %s", path)
        return existing
    except ReferenceError:
        pass  # none yet, or for other data: write it
    reference = OnlineReference(build_model(dpo.reference_from or config.init_from))
    precompute_reference_logps(reference, config, dims, autocast, device_type, should_stop=should_stop)
    del reference
    return PrecomputedReference.read(path, fingerprint)


def precompute_reference_logps(reference: OnlineReference, config: RunConfig, dims, autocast,
                               device_type: str, should_stop=None) -> Path:
    """One reference forward over an epoch of the data → ``config.reference_logps_path`` (JSON,
    pair id → [chosen sum, rejected sum]). Call on all ranks.

    ``should_stop()`` is asked on every rank before each group of micro-batches (it may all-reduce: every
    rank reads the same number of groups); when it returns a signal's name the pass is abandoned, nothing
    written, and ``RunStopped`` raised."""
    path = config.reference_logps_path
    model_config = reference.model.modules[0].config
    device_id = torch.cuda.current_device() if device_type == "cuda" else None
    loader = PackedDataLoader(config.data,
                              image_size=model_config.vision.image_size, num_image_tokens=model_config.num_image_tokens,
                              image_token_id=model_config.image_token_id, rank=dims.dp_rank, world_size=dims.layout.dp,
                              device_id=device_id, pin_memory_device=device_id)
    device = next(iter(reference.model.parameters())).device
    group = max(dims.layout.pp, config.parallel.microbatches) if dims.layout.pp > 1 else 1
    if config.parallel.pipeline_schedule == "interleaved_1f1b" and dims.layout.pp > 1:
        group = -(-group // dims.layout.pp) * dims.layout.pp
    keep = reference.model.holds_loss and dims.tp_rank == 0
    found: dict[str, list[float]] = {}
    duplicates: list[str] = []
    started = time.perf_counter()
    batches_iter = iter(loader)
    done = False
    try:
        while not done:
            stop = should_stop() if should_stop is not None else None
            if stop is not None:
                raise RunStopped(stop, f"during the DPO reference pass, after {len(found)} pair(s) of this rank in "
                                       f"{time.perf_counter() - started:.0f} s; nothing was written: the pass "
                                       f"runs again on resume (train.resume=auto)")
            batches = []
            while len(batches) < group:
                batch = next(batches_iter)
                if batch.epoch > 0:
                    done = True
                    break
                batches.append(batch)
            if not batches:
                break
            real = len(batches)
            batches += [batches[-1].blank() for _ in range(group - real)]  # a schedule wants whole groups
            sums = reference.logps([b.to(device) for b in batches], autocast)
            if keep:
                for batch, values in zip(batches[:real], sums):
                    values = values.tolist()
                    for k, pair in enumerate(batch.pair_ids):
                        if pair in found:
                            duplicates.append(pair)
                        found[pair] = [values[2 * k], values[2 * k + 1]]
    finally:
        loader.close()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (found, duplicates))
    error = None
    if dist.get_rank() == 0:
        merged: dict[str, list[float]] = {}
        duplicates = [d for _, dup in gathered for d in dup]
        for part, _ in gathered:
            for pair, values in part.items():
                if pair in merged:
                    duplicates.append(pair)
                merged[pair] = values
        if duplicates:
            error = (f"{config.data.shards}: pair id(s) {sorted(set(duplicates))[:10]} occur more than once; "
                     f"reference log-probs are keyed by pair id, so ids must be unique")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"format": PrecomputedReference.FORMAT, "shards": loader.shards.fingerprint,
                                       "shards_dir": str(config.data.shards), "reference": config.dpo.reference_from
                                       or config.init_from, "pairs": merged}) + "\n")
            os.replace(tmp, path)
            log.info("train: reference log-probs of %d pairs written to %s in %.1f s", len(merged), path,
                     time.perf_counter() - started)
    status = [error]
    dist.broadcast_object_list(status, src=0)
    if status[0]:
        raise ReferenceError(status[0])
    return path
