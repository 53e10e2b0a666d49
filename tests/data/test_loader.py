"""The loader: epochs cover every sample once over the ranks, exact resume, pairs, counters, backends."""

import dataclasses
import json
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from pivot_mega.config import ConfigError, load_model_config
from pivot_mega.data.config import DataConfig, load_data_config
from pivot_mega.data.images import dali_unavailable_reason
from pivot_mega.data.loader import PackedDataLoader
from pivot_mega.data.shard_builder import BuildOptions, build_shards
from pivot_mega.data.shards import ShardSet
from pivot_mega.data.sources import DataError
from pivot_mega.data.templates import IGNORE_INDEX, TextEncoder
from pivot_mega.presets import model_preset_path
from tests.data.helpers import dpo_rows, llava_rows, write_images, write_json
from tests.distributed import require_procs, run_workers

IMAGE_SIZE, IMAGE_TOKENS = 32, 4


@pytest.fixture(scope="module")
def llava_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llava")
    rng = np.random.default_rng(0)
    names = write_images(tmp / "img", rng, 40)
    rows = llava_rows(rng, names)
    rows += [{"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
             {"id": "two", "image": names[:2], "conversations": [{"from": "human", "value": "<image> or <image>?"},
                                                                 {"from": "gpt", "value": "the first"}]}]
    write_json(tmp / "llava.json", rows)
    build_shards("llava", tmp / "llava.json", tmp / "shards", tmp / "img",
                 BuildOptions(samples_per_shard=7, workers=1, progress=False))
    return tmp / "shards"


@pytest.fixture(scope="module")
def dpo_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    rng = np.random.default_rng(1)
    names = write_images(tmp / "img", rng, 24)
    rows = dpo_rows(rng, names)
    rows.append({"id": "text-pair", "prompt": "say hi", "chosen": "hi", "rejected": "go away"})
    write_json(tmp / "dpo.json", rows)
    build_shards("dpo", tmp / "dpo.json", tmp / "shards", tmp / "img", BuildOptions(workers=1, progress=False))
    return tmp / "shards"


def _config(shards, tokenizer_dir, **overrides) -> DataConfig:
    values = dict(shards=str(shards), tokenizer=str(tokenizer_dir), max_seq_len=256, micro_batch_rows=2,
                  window_size=8, backend="python", num_threads=1, prefetch=2, seed=11)
    values.update(overrides)
    return load_data_config(values)


def _loader(config, image_token, rank=0, world_size=1):
    return PackedDataLoader(config, image_size=IMAGE_SIZE, num_image_tokens=IMAGE_TOKENS, image_token_id=image_token,
                            rank=rank, world_size=world_size)


def _epoch(loader, with_state=False):
    """The micro-batches of epoch 0 (and the loader state after the last of them)."""
    batches, state = [], None
    for batch in loader:
        if batch.epoch > 0:
            return (batches, state) if with_state else batches
        batches.append(batch)
        state = loader.state_dict()


def _samples(batches) -> list[int]:
    return [int(s) for b in batches for s in b.segment_sample.tolist() if s >= 0]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_an_epoch_covers_every_sample_once_over_the_ranks(llava_shards, tokenizer_dir, image_token, world_size):
    config = _config(llava_shards, tokenizer_dir)
    loaders = [_loader(config, image_token, r, world_size) for r in range(world_size)]
    epochs, states = zip(*[_epoch(loader, with_state=True) for loader in loaders])
    assert len({len(e) for e in epochs}) == 1  # ranks step together
    seen = [s for e in epochs for s in _samples(e)]
    assert sorted(seen) == list(range(len(ShardSet(llava_shards))))
    # Every rank planned the same thing: same position, same global counts.
    assert len({json.dumps({k: v for k, v in s.items() if k != "counters"}) for s in states}) == 1
    assert all(s["counters"]["samples_read"] == len(seen) for s in states)
    for batch in (b for e in epochs for b in e):
        assert batch.input_ids.shape == (2, 256) and batch.packed.cu_seqlens[-1] == 2 * 256
        assert int((batch.input_ids == image_token).sum()) == IMAGE_TOKENS * len(batch.pixel_values)
        assert batch.pixel_values.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)


def _rank_epoch(rank, world_size, shards, tokenizer_dir, image_token):
    loader = _loader(_config(shards, tokenizer_dir), image_token, rank, world_size)
    batches, state = _epoch(loader, with_state=True)
    del state["counters"]
    return {"samples": _samples(batches), "batches": len(batches), "state": json.dumps(state)}


@require_procs(2)
@pytest.mark.multiproc
def test_ranks_in_separate_processes_split_the_epoch(llava_shards, tokenizer_dir, image_token):
    results = run_workers(_rank_epoch, 2, str(llava_shards), str(tokenizer_dir), image_token, timeout=240)
    assert results[0]["batches"] == results[1]["batches"] and results[0]["state"] == results[1]["state"]
    assert not set(results[0]["samples"]) & set(results[1]["samples"])
    assert sorted(results[0]["samples"] + results[1]["samples"]) == list(range(len(ShardSet(llava_shards))))


def _same_batches(a, b, pixel_levels=0.0):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("input_ids", "labels", "segment_sample", "pair_segments"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        for name in ("position_ids", "cu_seqlens", "segment_ids"):
            assert torch.equal(getattr(x.packed, name), getattr(y.packed, name)), name
        for name in ("positions", "tokens", "sequence"):
            assert torch.equal(getattr(x.targets, name), getattr(y.targets, name)), name
        assert x.image_refs == y.image_refs and x.epoch == y.epoch
        assert x.pixel_values.shape == y.pixel_values.shape
        if len(x.pixel_values):
            assert float((x.pixel_values - y.pixel_values).abs().max()) * 127.5 <= pixel_levels


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_resume_continues_exactly(llava_shards, tokenizer_dir, image_token, seed, rank, world_size):
    rng = np.random.default_rng(seed)
    config = _config(llava_shards, tokenizer_dir, seed=int(rng.integers(1000)))
    straight = _loader(config, image_token, rank, world_size)
    iterator = iter(straight)
    per_epoch = len(_epoch(_loader(config, image_token, rank, world_size)))
    expected, states = [], []
    for _ in range(2 * per_epoch + 2):
        expected.append(next(iterator))
        states.append(json.loads(json.dumps(straight.state_dict())))  # a checkpoint holds it as JSON
    assert any(s["carry"] for s in states)  # resuming inside a window with units carried into it

    for stop in range(1, per_epoch + 2):
        resumed = _loader(config, image_token, rank, world_size)
        resumed.load_state_dict(states[stop - 1])
        batches = iter(resumed)
        more = 2 * per_epoch + 2 - stop if stop == per_epoch // 2 else 2  # one resume runs into the next epoch
        _same_batches([next(batches) for _ in range(more)], expected[stop:stop + more])
        assert resumed.counters.as_dict() == states[stop + more - 1]["counters"]


def test_restoring_replaces_the_running_iterator(llava_shards, tokenizer_dir, image_token):
    loader = _loader(_config(llava_shards, tokenizer_dir), image_token)
    old = iter(loader)
    first = next(old)
    state = loader.state_dict()
    next(old)
    loader.load_state_dict(state)
    with pytest.raises(RuntimeError, match="restored or iterated again"):
        next(old)
    again = _loader(_config(llava_shards, tokenizer_dir), image_token)
    batches = iter(again)
    _same_batches([next(batches), next(batches)][1:], [next(iter(loader))])
    assert first.epoch == 0


def test_a_state_from_another_run_is_refused(llava_shards, tokenizer_dir, image_token):
    loader = _loader(_config(llava_shards, tokenizer_dir), image_token)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(DataError, match="seed: saved 11, now 12"):
        _loader(_config(llava_shards, tokenizer_dir, seed=12), image_token).load_state_dict(state)
    with pytest.raises(DataError, match="world_size: saved 1, now 2"):
        _loader(_config(llava_shards, tokenizer_dir), image_token, 0, 2).load_state_dict(state)
    with pytest.raises(DataError, match="layout: saved"):
        _loader(_config(llava_shards, tokenizer_dir, max_seq_len=300), image_token).load_state_dict(state)


@pytest.mark.skipif(dali_unavailable_reason() is not None, reason=str(dali_unavailable_reason()))
def test_dali_and_python_backends_give_the_same_batches(llava_shards, tokenizer_dir, image_token):
    dali = _epoch(_loader(_config(llava_shards, tokenizer_dir, backend="dali"), image_token))
    python = _epoch(_loader(_config(llava_shards, tokenizer_dir, backend="python"), image_token))
    _same_batches(dali, python, pixel_levels=1.0)  # within 1/255


def test_dpo_pairs_stay_together(dpo_shards, tokenizer_dir, image_token):
    config = _config(dpo_shards, tokenizer_dir, mode="dpo", max_seq_len=384, dpo_layout="separate")
    batches = _epoch(_loader(config, image_token, 0, 2)) + _epoch(_loader(config, image_token, 1, 2))
    pairs = 0
    for batch in batches:
        cu = batch.packed.cu_seqlens.tolist()
        ids = batch.input_ids.flatten()
        segments_with_images = []
        for k in range(len(cu) - 1):
            n = int((ids[cu[k]:cu[k + 1]] == image_token).sum())
            segments_with_images += [k] * (n // IMAGE_TOKENS)
        for chosen, rejected in batch.pair_segments.tolist():
            pairs += 1
            assert rejected == chosen + 1 and cu[chosen] // 384 == (cu[rejected + 1] - 1) // 384
            c, r = ids[cu[chosen]:cu[chosen + 1]], ids[cu[rejected]:cu[rejected + 1]]
            labels = batch.labels.flatten()
            prompt = int((labels[cu[chosen]:cu[chosen + 1]] == IGNORE_INDEX).nonzero().max()) + 1
            prompt = min(prompt, int((labels[cu[chosen]:cu[chosen + 1]] != IGNORE_INDEX).nonzero().min()))
            assert torch.equal(c[:prompt], r[:prompt])
            # The pair's image is given once per sequence, the same pixels both times.
            images = [i for i, k in enumerate(segments_with_images) if k in (chosen, rejected)]
            if images:
                assert len(images) == 2 and torch.equal(batch.pixel_values[images[0]], batch.pixel_values[images[1]])
        assert set(batch.segment_sample[batch.segment_sample >= 0].tolist()) == \
            {batch.segment_sample[c].item() for c, _ in batch.pair_segments.tolist()}
    assert pairs == len(ShardSet(dpo_shards))


def test_shared_prefix_pairs_hold_their_prompt_and_image_once(dpo_shards, tokenizer_dir, image_token):
    separate = _epoch(_loader(_config(dpo_shards, tokenizer_dir, mode="dpo", max_seq_len=384, shuffle=False,
                                      dpo_layout="separate"), image_token))
    shared = _epoch(_loader(_config(dpo_shards, tokenizer_dir, mode="dpo", max_seq_len=384, shuffle=False),
                            image_token))
    by_id = {}
    for batch in separate:
        cu, ids, labels = batch.packed.cu_seqlens.tolist(), batch.input_ids.flatten(), batch.labels.flatten()
        for chosen, rejected in batch.pair_segments.tolist():
            by_id[batch.sample_ids[chosen]] = [(ids[cu[k]:cu[k + 1]], labels[cu[k]:cu[k + 1]]) for k in (chosen, rejected)]
    pairs = 0
    for batch in shared:
        packed = batch.packed
        cu, ids, labels = packed.cu_seqlens.tolist(), batch.input_ids.flatten(), batch.labels.flatten()
        for chosen, rejected in batch.pair_segments.tolist():
            pairs += 1
            prefix = chosen - 1
            assert rejected == chosen + 1 and packed.prefix[chosen] == packed.prefix[rejected] == prefix
            assert packed.prefix[prefix] == -1 and batch.segment_sequence[prefix] == -1
            for k, (whole_ids, whole_labels) in zip((chosen, rejected), by_id[batch.sample_ids[chosen]]):
                # prefix + branch is the separate sequence, positions continue from the prefix
                assert torch.equal(torch.cat([ids[cu[prefix]:cu[prefix + 1]], ids[cu[k]:cu[k + 1]]]), whole_ids)
                assert torch.equal(torch.cat([labels[cu[prefix]:cu[prefix + 1]], labels[cu[k]:cu[k + 1]]]),
                                   whole_labels)
                assert packed.position_ids.flatten()[cu[k]] == cu[prefix + 1] - cu[prefix]
        # one image run per pair with an image: in its prefix
        assert len(batch.pixel_values) == sum(1 for _ in batch.image_refs) and \
            len(batch.image_refs) == len(set(batch.image_refs))
    assert pairs == len(by_id) == len(ShardSet(dpo_shards))
    tokens = lambda batches: sum(b.num_tokens for b in batches)  # noqa: E731
    assert tokens(shared) < tokens(separate)


def test_skips_truncation_and_counters(llava_shards, tokenizer_dir, image_token):
    encoder = TextEncoder(tokenizer_dir, template="qwen2", mode="lm", system_prompt=DataConfig.system_prompt,
                          image_token_id=image_token, num_image_tokens=IMAGE_TOKENS, max_seq_len=10**6,
                          truncate_response=False)
    shard_set = ShardSet(llava_shards)
    lengths = [u.length for u in encoder.encode([(i, shard_set.sidecar(i)) for i in range(len(shard_set))])]
    limit = int(np.percentile(lengths, 70))
    too_long = sum(n > limit for n in lengths)
    assert too_long > 0

    loader = _loader(_config(llava_shards, tokenizer_dir, max_seq_len=limit), image_token)
    batches, state = _epoch(loader, with_state=True)
    c = type(loader.counters).from_dict(state["counters"])
    assert dict(c.skipped) == {"too_long": too_long} and c.samples == len(lengths) - too_long
    assert c.samples_read == len(lengths) and c.micro_batches == len(batches)
    assert c.tokens == sum(b.num_tokens for b in batches) == sum(n for n in lengths if n <= limit)
    padding = sum(int(b.packed.cu_seqlens.diff()[b.segment_sample < 0].sum()) for b in batches)
    assert c.padding_tokens == padding
    assert c.padding_fraction == pytest.approx(c.padding_tokens / (len(batches) * 2 * limit))
    assert c.label_tokens == sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches)
    assert c.images == sum(len(b.pixel_values) for b in batches)

    loader = _loader(_config(llava_shards, tokenizer_dir, max_seq_len=limit, truncate_response=True), image_token)
    batches, state = _epoch(loader, with_state=True)
    assert state["counters"]["skipped"] == {} and state["counters"]["truncated"] == too_long
    assert sorted(_samples(batches)) == list(range(len(lengths)))


def test_an_epoch_with_nothing_to_train_on_is_an_error(llava_shards, tokenizer_dir, image_token):
    loader = _loader(_config(llava_shards, tokenizer_dir, max_seq_len=8, prefetch=0), image_token)
    with pytest.raises(DataError, match=r"epoch 0 has no sample to train on; skipped: \{'too_long': 42\}"):
        next(iter(loader))


def test_dpo_mode_needs_pairs(llava_shards, tokenizer_dir, image_token):
    with pytest.raises(DataError, match="data.mode 'dpo' needs preference pairs"):
        _loader(_config(llava_shards, tokenizer_dir, mode="dpo"), image_token)


def test_data_config_file(tmp_path, llava_shards, tokenizer_dir):
    (tmp_path / "data.yaml").write_text(f"shards: {llava_shards}\ntokenizer: tok\nmax_seq_len: 512\n")
    config = load_data_config(tmp_path / "data.yaml", ["micro_batch_rows=4"])
    assert config.tokenizer == str(tmp_path / "tok") and config.micro_batch_rows == 4 and config.max_seq_len == 512
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['max_len'\]"):
        load_data_config(tmp_path / "data.yaml", ["max_len=3"])
    with pytest.raises(ConfigError, match="data.template: 'plain' renders captions"):
        load_data_config({"shards": "s", "tokenizer": "t", "mode": "dpo", "template": "plain"})
    with pytest.raises(ConfigError, match="'auto' is not one of|not one of"):
        load_data_config({"shards": "s", "tokenizer": "t", "backend": "gpu"})


def test_micro_batches_run_through_the_model(llava_shards, tokenizer_dir, seed):
    from pivot_mega.models import VisionLanguageModel

    model_config = load_model_config(model_preset_path("tiny"))
    model = VisionLanguageModel(model_config).init_weights(seed).eval()
    loader = PackedDataLoader(_config(llava_shards, tokenizer_dir, max_seq_len=160), rank=0, world_size=1,
                              image_size=model_config.vision.image_size, num_image_tokens=model_config.num_image_tokens,
                              image_token_id=model_config.image_token_id)
    batch = next(iter(loader))
    with torch.no_grad():
        logits = model(batch.input_ids, batch.pixel_values, packed=batch.packed)
    assert logits.shape == (*batch.input_ids.shape, model_config.language.vocab_size) and torch.isfinite(logits).all()
    # Packed rows attend within each sample: the first sample alone gives the same logits.
    start, end = batch.packed.cu_seqlens[:2].tolist()
    first = batch.segment_sample[0].item()
    images = sum(1 for index, _ in batch.image_refs if index == first)
    with torch.no_grad():
        alone = model(batch.input_ids[:1, start:end], batch.pixel_values[:images])
    assert torch.allclose(alone[0], logits[0, start:end], atol=1e-4)
    counts = Counter(batch.segment_sample.tolist())
    assert all(n == 1 for s, n in counts.items() if s >= 0)


def _tensor_fields(obj, prefix=""):
    """(dotted name, tensor) of every tensor field of a MicroBatch and of its PackedSeqs / Targets."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, torch.Tensor):
            yield prefix + field.name, value
        elif dataclasses.is_dataclass(value):
            yield from _tensor_fields(value, f"{prefix}{field.name}.")


@pytest.mark.parametrize("dpo_layout, prefetch", [("shared_prefix", 2), ("separate", 0)])
def test_batches_for_a_gpu_are_pinned_where_they_are_made(dpo_shards, tokenizer_dir, image_token, monkeypatch,
                                                          dpo_layout, prefetch):
    """No CUDA here, so pinning and the thread's device binding are stood in for and recorded: every
    tensor that ``MicroBatch.to`` moves must be a pinned copy, made in the thread that makes the batch
    (the prefetch thread, bound to the training GPU first), and the batches must not change."""
    pinned, bound = {}, {}

    def pin_memory(tensor):
        copy = tensor.clone()
        pinned[id(copy)] = (threading.current_thread().name, copy)  # the copy kept alive: ids stay unique
        return copy
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: bound.setdefault(threading.current_thread().name,
                                                                                  device))
    config = _config(dpo_shards, tokenizer_dir, mode="dpo", max_seq_len=384, dpo_layout=dpo_layout,
                     prefetch=prefetch)
    plain = _epoch(_loader(config, image_token))
    assert not pinned and not bound  # training on the CPU: nothing is pinned
    loader = PackedDataLoader(config, image_size=IMAGE_SIZE, num_image_tokens=IMAGE_TOKENS,
                              image_token_id=image_token, pin_memory_device=3)
    batches = _epoch(loader)
    loader.close()
    _same_batches(batches, plain)
    producer = "pivot-data-prefetch" if prefetch else threading.main_thread().name
    moved_names = set()
    for batch in batches:
        moved = dict(_tensor_fields(batch.to("meta")))
        for name, tensor in _tensor_fields(batch):
            if moved[name].device.type == "meta":
                moved_names.add(name)
                assert pinned.get(id(tensor), (None, None))[1] is tensor, f"{name} is not pinned"
                assert pinned[id(tensor)][0] == producer
    assert {"input_ids", "images", "packed.cu_seqlens", "targets.tokens"} <= moved_names
    assert ("packed.prefix" in moved_names) == (dpo_layout == "shared_prefix")
    assert bound == ({producer: 3} if prefetch else {})
