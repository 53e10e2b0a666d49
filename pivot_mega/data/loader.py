"""The training data loader: shards → packed micro-batches for one data-parallel rank, resumable.

Every rank runs the same deterministic plan and takes its own part of it:

1. Epoch order: a permutation of all samples from ``(seed, epoch)`` (or file order without shuffle).
2. Windows of ``window_size`` samples (plus the units carried over from the previous window) are
   read (only the small JSON sidecars, through the DALI index), rendered by the template, tokenized
   and packed (``packing.plan_window``) into steps of ``world_size`` micro-batches balanced in tokens.
3. Rank ``r`` takes micro-batch ``r`` of each step, reads and decodes only its own images.
4. Training on a GPU, the micro-batch's tensors are pinned (``MicroBatch.pin_memory``) where it is
   made, in the prefetch thread, so the trainer's ``MicroBatch.to(device)`` copies asynchronously.

Each rank tokenizes the whole window (text is cheap next to images) so that packing and token
balancing need no communication; the plan, and so the loader state, is the same on every rank.

The state after a micro-batch is ``(epoch, cursor, carry, step)``: the window starts at ``cursor``
in the epoch order, ``carry`` lists the units carried into it, ``step`` counts its steps done.
Restoring it re-plans that window (same inputs, same plan) and continues with the next step, so a
resumed run yields exactly the micro-batches an uninterrupted run would have. It is plain JSON
(checkpoint it with the trainer's state) and is checked against the shards and the packing layout.

DALI's ``fn.readers.webdataset`` shuffles with a buffer and an RNG of its own, which neither the
python backend nor a resumed run could reproduce, and it cannot keep a DPO pair or a token-balanced
plan together; so the plan picks the samples, their bytes are read through the same DALI index
files, and DALI (or PIL) decodes them.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections import Counter
from typing import Iterator

import numpy as np
import torch

from .config import DataConfig
from .images import UndecodableImages, make_image_decoder
from ..batch import IGNORE_INDEX, MicroBatch
from .packing import build_micro_batch, plan_window
from .shards import BadSidecar, ShardSet
from .sources import DataError
from .templates import LoadSkip, TextEncoder, Unit

log = logging.getLogger(__name__)

STATE_VERSION = 1
BAD_IMAGE = "bad_image"
# Skips of broken data (not of samples a template or the length limit leaves out) are logged, this
# many per reason; the counters keep counting.
BROKEN_DATA = (BadSidecar.reason, BAD_IMAGE)
LOGGED_SKIPS = 5


@dataclasses.dataclass
class DataCounters:
    """Running totals for logging.

    ``samples_read`` and ``skipped`` count the whole plan (every rank reads every sidecar), except
    ``skipped["bad_image"]``: an image is decoded, and found broken, only by the rank that trains on
    it. The other counters cover this rank's micro-batches. A DPO pair is one sample. Both are counted
    when the micro-batch they come with is yielded (a window's reads and skips with its first one)
    and saved in the loader state, so they add up over the whole run, resumes included.
    """

    samples_read: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    samples: int = 0
    truncated: int = 0
    micro_batches: int = 0
    tokens: int = 0
    label_tokens: int = 0
    padding_tokens: int = 0
    images: int = 0
    replayed_steps: int = 0  # loader steps taken twice after resuming on another world size

    @property
    def padding_fraction(self) -> float:
        total = self.tokens + self.padding_tokens
        return self.padding_tokens / total if total else 0.0

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["skipped"] = dict(sorted(self.skipped.items()))
        out["padding_fraction"] = self.padding_fraction
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "DataCounters":
        data = {k: v for k, v in data.items() if k != "padding_fraction"}
        return cls(**{**data, "skipped": Counter(data.get("skipped", {}))})


@dataclasses.dataclass(frozen=True)
class _Position:
    epoch: int = 0
    cursor: int = 0
    carry: tuple[int, ...] = ()
    step: int = 0


@dataclasses.dataclass
class _Window:
    steps: list[list[list[list[Unit]]]]  # step → rank → row → units
    carry: tuple[int, ...]
    next_cursor: int
    samples_read: int
    skips: list[LoadSkip]


class PackedDataLoader:
    """Iterates packed micro-batches (``batch.MicroBatch``) of one rank, epoch after epoch, without end.

    ``image_size``, ``num_image_tokens`` and ``image_token_id`` come from the model config;
    ``rank`` / ``world_size`` are the data-parallel coordinates; ``device_id``: the GPU for
    ``decode_device: mixed``. ``pin_memory_device``: the GPU the batches are copied to, when
    training on one: their tensors are pinned where they are made (the prefetch thread, bound to
    that GPU), so the copies overlap with the step; None (CPU): nothing is pinned.
    """

    def __init__(self, config: DataConfig, *, image_size: int, num_image_tokens: int, image_token_id: int,
                 rank: int = 0, world_size: int = 1, device_id: int | None = None,
                 pin_memory_device: int | None = None):
        config.validate()
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.pin_memory_device = pin_memory_device
        self.shards = ShardSet(config.shards)
        counts = self.shards.manifest["counts"]
        if config.mode == "dpo" and counts["conversations"]:
            raise DataError(f"{config.shards}: data.mode 'dpo' needs preference pairs, but "
                            f"{counts['conversations']} of {counts['written']} samples are conversations")
        self.encoder = TextEncoder(config.tokenizer, template=config.template, mode=config.mode,
                                   system_prompt=config.system_prompt, image_token_id=image_token_id,
                                   num_image_tokens=num_image_tokens, max_seq_len=config.max_seq_len,
                                   truncate_response=config.truncate_response, dpo_layout=config.dpo_layout)
        self.decoder = make_image_decoder(config.backend, image_size=image_size, num_threads=config.num_threads,
                                          decode_device=config.decode_device, device_id=device_id)
        log.info("data: %d samples in %s, %s images, rank %d of %d", len(self.shards), config.shards,
                 self.decoder.name, rank, world_size)
        self.counters = DataCounters()
        self._logged_skips: Counter = Counter()
        self._position = _Position()
        self._generation = 0
        self._prefetcher: _Prefetcher | None = None

    # ------------------------------------------------------------------------------------------
    # iteration

    def __iter__(self) -> Iterator[MicroBatch]:
        self._stop_prefetch()
        self._generation += 1
        generation = self._generation
        produced = self._produce(self._position)
        if self.config.prefetch:
            produced = self._prefetcher = _Prefetcher(produced, self.config.prefetch, self.pin_memory_device)
        produced = iter(produced)
        try:
            while True:
                if generation != self._generation:
                    raise RuntimeError("the data loader was restored or iterated again; use the newest iterator")
                try:
                    batch, position, skips, read = next(produced)
                except StopIteration:
                    return
                self._count(batch, skips, read)
                self._position = position
                yield batch
        finally:
            if generation == self._generation:
                self._stop_prefetch()

    def _stop_prefetch(self) -> None:
        # One producer at a time: the image decoder is not shared between threads.
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def _count(self, batch: MicroBatch, skips: list[LoadSkip], read: int) -> None:
        c = self.counters
        c.samples_read += read
        c.skipped.update(s.reason for s in skips)
        for s in skips:
            if s.reason in BROKEN_DATA and self._logged_skips[s.reason] < LOGGED_SKIPS:
                self._logged_skips[s.reason] += 1
                more = (f" (the first {LOGGED_SKIPS} are logged, the rest only counted)"
                        if self._logged_skips[s.reason] == LOGGED_SKIPS else "")
                log.warning("data: rank %d skipped a sample (%s): %s%s", self.rank, s.reason, s.detail, more)
        c.samples += batch.num_samples
        c.truncated += batch.num_truncated
        c.micro_batches += 1
        c.tokens += batch.num_tokens
        c.label_tokens += batch.num_label_tokens
        c.padding_tokens += batch.num_padding_tokens
        c.images += len(batch.image_refs)

    def _produce(self, position: _Position):
        """(batch, position after it, skips and reads to count with it) for this rank, forever."""
        epoch, cursor, carry, step = position.epoch, position.cursor, position.carry, position.step
        pending_skips, pending_read = [], 0
        epoch_batches = int(position.step > 0)  # a saved position follows a micro-batch of its epoch
        order = self._epoch_order(epoch)
        while True:
            if cursor >= len(order) and not carry:
                if not epoch_batches:
                    raise DataError(f"{self.config.shards}: epoch {epoch} has no sample to train on; skipped: "
                                    f"{dict(Counter(s.reason for s in pending_skips))}")
                epoch, cursor, carry, step, epoch_batches = epoch + 1, 0, (), 0, 0
                order = self._epoch_order(epoch)
                continue
            window = self._plan(epoch, cursor, carry, order)
            if step == 0:
                pending_skips += window.skips
                pending_read += window.samples_read
            for s in range(step, len(window.steps)):
                batch, image_skips = self._materialize(window.steps[s][self.rank])
                batch.epoch = epoch
                units = [unit for rows in window.steps[s] for row in rows for unit in row]
                batch.global_samples = len(units)
                batch.global_tokens = sum(unit.length for unit in units)
                batch.global_label_tokens = sum(int((seq.labels != IGNORE_INDEX).sum())
                                                for unit in units for seq in unit.sequences)
                yield batch, _Position(epoch, cursor, carry, s + 1), pending_skips + image_skips, pending_read
                pending_skips, pending_read = [], 0
                epoch_batches += 1
            cursor, carry, step = window.next_cursor, window.carry, 0

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.shards)
        if not self.config.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.config.seed, epoch]).permutation(n)

    def _plan(self, epoch: int, cursor: int, carry: tuple[int, ...], order: np.ndarray) -> _Window:
        new = [int(i) for i in order[cursor:cursor + self.config.window_size]]
        next_cursor = cursor + len(new)
        final = next_cursor >= len(order)
        sidecars, skips = [], []
        for i in (*carry, *new):
            try:
                sidecars.append((i, self.shards.sidecar(i)))
            except BadSidecar as e:
                skips.append(LoadSkip(i, e.sample_id, e.reason, str(e)))
        encoded = self.encoder.encode(sidecars)
        skips += [u for u in encoded if isinstance(u, LoadSkip)]
        units = [u for u in encoded if isinstance(u, Unit)]
        rng = np.random.default_rng([self.config.seed, epoch, cursor, 1])
        plan = plan_window([u.length for u in units], self.config.max_seq_len, self.config.micro_batch_rows,
                           self.world_size, final, rng)
        steps = [[[[units[i] for i in row] for row in batch] for batch in step] for step in plan.steps]
        return _Window(steps, tuple(units[i].index for i in plan.carry), next_cursor, len(new), skips)

    def _materialize(self, rows: list[list[Unit]]) -> tuple[MicroBatch, list[LoadSkip]]:
        """This rank's micro-batch of planned rows, and the samples left out of it for a broken image.

        A sample whose image does not decode leaves its row (the row keeps its place, shorter): the
        plan, the same on every rank, stays as it is, and only this rank knows.
        """
        batch, unique = self._lay_out(rows)
        skips = []
        try:
            images = self._decode(unique)
        except UndecodableImages as e:
            sample_ids = {unit.index: unit.sample_id for row in rows for unit in row}
            for k, why in sorted(e.problems.items()):
                index, member = unique[k]
                where = f"{self.shards.member(index, member)}: sample {sample_ids[index]!r}"
                skips.append(LoadSkip(index, sample_ids[index], BAD_IMAGE, f"{where}: {why}"))
            dropped = {s.index for s in skips}
            batch, unique = self._lay_out([[unit for unit in row if unit.index not in dropped] for row in rows])
            images = self._decode(unique)
        batch.images = images
        where = {ref: k for k, ref in enumerate(unique)}
        if len(unique) != len(batch.image_refs):
            batch.image_index = torch.tensor([where[ref] for ref in batch.image_refs], dtype=torch.int64)
        # Fresh pinned copies for every batch, never reused by the loader: a copy still in flight
        # reads memory nothing else writes.
        return (batch.pin_memory() if self.pin_memory_device is not None else batch), skips

    def _decode(self, refs: list[tuple[int, str]]) -> torch.Tensor:
        return self.decoder([self.shards.image_bytes(index, member) for index, member in refs])

    def _lay_out(self, rows: list[list[Unit]]) -> tuple[MicroBatch, list[tuple[int, str]]]:
        """The micro-batch without images, and the (sample, member) of each image to decode, once."""
        try:
            batch = build_micro_batch(rows, self.config.max_seq_len, self.encoder.pad_token_id)
        except ValueError as e:
            raise DataError(f"{self.config.shards}: {e}") from e
        # A DPO pair shows its image to both sequences: decoded once, indexed twice.
        return batch, list(dict.fromkeys(batch.image_refs))

    # ------------------------------------------------------------------------------------------
    # state

    def state_dict(self) -> dict:
        """JSON-serialisable position after the last micro-batch yielded, with the counters."""
        p = self._position
        return {"version": STATE_VERSION, "shards": self.shards.fingerprint, "seed": self.config.seed,
                "shuffle": self.config.shuffle, "world_size": self.world_size, "layout": self._layout(),
                "epoch": p.epoch, "cursor": p.cursor, "carry": list(p.carry), "step": p.step,
                "counters": self.counters.as_dict()}

    def load_state_dict(self, state: dict, *, allow_new_world_size: bool = False) -> None:
        """Continues after the micro-batch the state was taken at; call before iterating.

        The plan depends on the number of data-parallel ranks, so only the same world size resumes
        exactly. With ``allow_new_world_size`` a state from another world size restarts the window
        it was in (same epoch order, same carried samples): the steps of that window already taken
        are taken again, which is logged (``counters.replayed_steps``), and nothing is skipped.
        """
        expected = {"version": STATE_VERSION, "shards": self.shards.fingerprint, "seed": self.config.seed,
                    "shuffle": self.config.shuffle, "world_size": self.world_size, "layout": self._layout()}
        wrong = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        new_world = allow_new_world_size and set(wrong) == {"world_size"}
        if wrong and not new_world:
            details = ", ".join(f"{k}: saved {saved!r}, now {now!r}" for k, (saved, now) in wrong.items())
            raise DataError(f"data loader state does not match this run ({details}); an exact resume needs the "
                            f"same shards, seed, world size and packing layout")
        self._stop_prefetch()
        step = state["step"]
        self.counters = DataCounters.from_dict(state["counters"])
        if new_world:
            log.warning("data: resuming on %d data-parallel rank(s) instead of %d: the packing window at "
                        "sample %d of epoch %d restarts, so its first %d step(s) are taken again",
                        self.world_size, state["world_size"], state["cursor"], state["epoch"], step)
            self.counters.replayed_steps += step
            step = 0
        self._position = _Position(state["epoch"], state["cursor"], tuple(state["carry"]), step)
        self._generation += 1

    def _layout(self) -> dict:
        c = self.config
        layout = {"template": c.template, "mode": c.mode, "system_prompt": c.system_prompt,
                  "max_seq_len": c.max_seq_len, "micro_batch_rows": c.micro_batch_rows, "window_size": c.window_size,
                  "truncate_response": c.truncate_response}
        if c.mode == "dpo":  # a pair's length, and so the plan, depends on it
            layout["dpo_layout"] = c.dpo_layout
        return layout

    def close(self) -> None:
        self._stop_prefetch()
        self.decoder.close()
        self.shards.close()


class _Prefetcher:
    """Runs an iterator in a background thread, ``depth`` items ahead; errors re-raise in the consumer.

    ``cuda_device``: the GPU the thread works for (CUDA's current device is per thread, and pinning
    from a thread left on device 0 would open a context there for every rank of the node).
    """

    _DONE = object()

    def __init__(self, items: Iterator, depth: int, cuda_device: int | None = None):
        self._items, self._cuda_device = items, cuda_device
        self._buffer: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pivot-data-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._cuda_device is not None:
                torch.cuda.set_device(self._cuda_device)
            for item in self._items:
                if not self._put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)
            return
        self._put(self._DONE)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._buffer.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            try:
                item = self._buffer.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    raise RuntimeError("the data loader's prefetch thread was stopped") from None
                continue
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
