"""Broken shards at train time: one DataError (or one counted, logged skip) naming the file, member and sample.

A real shard set is built once per mode, copied per test and broken the way disks and half-finished
copies break it: a member's bytes overwritten in place, an index or tar deleted, the manifest cut.
"""

import json
import logging
import re
import shutil

import numpy as np
import pytest

from pivot_mega.config import ConfigError
from pivot_mega.data.config import load_data_config
from pivot_mega.data.loader import PackedDataLoader
from pivot_mega.data.shard_builder import BuildOptions, build_shards
from pivot_mega.data.shards import MANIFEST, ShardSet
from pivot_mega.data.sources import DataError
from tests.data.helpers import dpo_rows, llava_rows, write_images, write_json

IMAGE_SIZE, IMAGE_TOKENS = 16, 2
SAMPLES = 8
BROKEN = 5  # the sample each test breaks: in the second shard (3 samples a shard)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{mode: pristine shard directory}, 8 single-image samples in shards of 3."""
    out = {}
    for mode, rows_of in (("lm", llava_rows), ("dpo", dpo_rows)):
        tmp = tmp_path_factory.mktemp(mode)
        rng = np.random.default_rng(0)
        names = write_images(tmp / "img", rng, SAMPLES)
        kind = "llava" if mode == "lm" else "dpo"
        write_json(tmp / f"{kind}.json", rows_of(rng, names))
        build_shards(kind, tmp / f"{kind}.json", tmp / "shards", tmp / "img",
                     BuildOptions(samples_per_shard=3, workers=1, progress=False))
        out[mode] = tmp / "shards"
    return out


@pytest.fixture
def lm_shards(built, tmp_path):
    return shutil.copytree(built["lm"], tmp_path / "shards")


@pytest.fixture
def dpo_shards(built, tmp_path):
    return shutil.copytree(built["dpo"], tmp_path / "shards")


def _loader(shards, tokenizer_dir, image_token, mode="lm", rank=0, world_size=1):
    config = load_data_config(dict(shards=str(shards), tokenizer=str(tokenizer_dir), mode=mode, max_seq_len=256,
                                   micro_batch_rows=2, window_size=4, backend="python", num_threads=1,
                                   prefetch=1, seed=3))
    return PackedDataLoader(config, image_size=IMAGE_SIZE, num_image_tokens=IMAGE_TOKENS, image_token_id=image_token,
                            rank=rank, world_size=world_size)


def _epoch(loader, caplog=None) -> tuple[list[str], dict, list[str]]:
    """Sample ids trained on in epoch 0, the counters and the warnings logged by then (the first
    batch of epoch 1 is counted, and may log, before it is seen)."""
    ids, counters, warnings = [], None, []
    for batch in loader:
        if batch.epoch > 0:
            return ids, counters, warnings
        ids += [s for s in dict.fromkeys(batch.sample_ids) if s]  # a DPO pair is 2 or 3 segments
        counters = loader.counters.as_dict()
        if caplog is not None:
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _member(shards, index: int, ext: str) -> tuple[str, int, int, str]:
    """(tar path, byte offset, size, member name) of one member of sample ``index``."""
    shard_set = ShardSet(shards)
    member = shard_set.samples[index][ext]
    tar = shards / shard_set.manifest["shards"][member.shard]["tar"]
    shard_set.close()
    return str(tar), member.offset, member.size, f"{index:09d}.{ext}"


def _overwrite(shards, index: int, ext: str, data: bytes) -> tuple[str, str]:
    """Replaces a member's bytes in place (padded with spaces to its size); returns (tar path, member name)."""
    tar, offset, size, name = _member(shards, index, ext)
    assert len(data) <= size
    with open(tar, "r+b") as f:
        f.seek(offset)
        f.write(data.ljust(size, b" "))
    return tar, name


def _sidecar(shards, index: int) -> dict:
    shard_set = ShardSet(shards)
    try:
        return json.loads(shard_set.read(shard_set.samples[index]["json"]))
    finally:
        shard_set.close()


def _image_ext(shards, index: int) -> str:
    return _sidecar(shards, index)["images"][0]


# ----------------------------------------------------------------------------------------------
# One bad sample: skipped, counted by reason, logged with its shard, member and id


def _assert_skipped(loader, caplog, reason: str, tar: str, name: str, sample_id: str | None) -> str:
    """Epoch 0 trains on every sample but one, counted under ``reason``, with one warning naming it."""
    with caplog.at_level(logging.WARNING, logger="pivot_mega.data.loader"):
        trained, counters, warnings = _epoch(loader, caplog)
    assert counters["skipped"] == {reason: 1}
    assert counters["samples_read"] == SAMPLES
    assert len(trained) == SAMPLES - 1
    if sample_id is not None:
        assert sample_id not in trained
    assert len(warnings) == 1, warnings
    assert reason in warnings[0] and tar in warnings[0] and name in warnings[0]
    if sample_id is not None:
        assert repr(sample_id) in warnings[0]
    return warnings[0]


@pytest.mark.parametrize("field", ["id", "images", "conversations"])
def test_an_lm_sidecar_missing_a_field_is_a_counted_skip(lm_shards, tokenizer_dir, image_token, caplog, field):
    sidecar = _sidecar(lm_shards, BROKEN)
    sample_id = sidecar["id"] if field != "id" else None
    del sidecar[field]
    tar, name = _overwrite(lm_shards, BROKEN, "json", json.dumps(sidecar).encode())
    message = _assert_skipped(_loader(lm_shards, tokenizer_dir, image_token), caplog, "bad_sidecar", tar, name,
                              sample_id)
    assert repr(field) in message


def test_an_lm_sidecar_with_a_broken_turn_is_a_counted_skip(lm_shards, tokenizer_dir, image_token, caplog):
    sidecar = _sidecar(lm_shards, BROKEN)
    sidecar["conversations"][1] = {"from": "gpt"}
    tar, name = _overwrite(lm_shards, BROKEN, "json", json.dumps(sidecar).encode())
    message = _assert_skipped(_loader(lm_shards, tokenizer_dir, image_token), caplog, "bad_sidecar", tar, name,
                              sidecar["id"])
    assert "conversations[1]" in message


@pytest.mark.parametrize("field", ["id", "images", "prompt", "chosen"])
def test_a_dpo_sidecar_missing_a_field_is_a_counted_skip(dpo_shards, tokenizer_dir, image_token, caplog, field):
    sidecar = _sidecar(dpo_shards, BROKEN)
    sample_id = sidecar["id"] if field != "id" else None
    del sidecar[field]
    tar, name = _overwrite(dpo_shards, BROKEN, "json", json.dumps(sidecar).encode())
    message = _assert_skipped(_loader(dpo_shards, tokenizer_dir, image_token, mode="dpo"), caplog, "bad_sidecar",
                              tar, name, sample_id)
    assert repr(field) in message


def test_a_sidecar_naming_a_member_the_sample_lacks_is_a_counted_skip(lm_shards, tokenizer_dir, image_token, caplog):
    sidecar = _sidecar(lm_shards, BROKEN)
    sidecar["images"] = ["bmp"]
    tar, name = _overwrite(lm_shards, BROKEN, "json", json.dumps(sidecar).encode())
    message = _assert_skipped(_loader(lm_shards, tokenizer_dir, image_token), caplog, "bad_sidecar", tar, name,
                              sidecar["id"])
    assert "'bmp'" in message


def test_a_sidecar_that_is_not_json_is_a_counted_skip(lm_shards, tokenizer_dir, image_token, caplog):
    tar, name = _overwrite(lm_shards, BROKEN, "json", b'{"id": "llava-5", "conv')
    message = _assert_skipped(_loader(lm_shards, tokenizer_dir, image_token), caplog, "bad_sidecar", tar, name, None)
    assert "not valid JSON" in message


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_an_image_that_does_not_decode_is_a_counted_skip(lm_shards, tokenizer_dir, image_token, caplog, how):
    ext = _image_ext(lm_shards, BROKEN)
    tar, offset, size, name = _member(lm_shards, BROKEN, ext)
    with open(tar, "rb") as f:
        f.seek(offset)
        original = f.read(size)
    garbage = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    # Truncated: the header and the first rows survive, the rest of the member is blank.
    broken = garbage if how == "garbage" else original[:size // 3].ljust(size, b" ")
    _overwrite(lm_shards, BROKEN, ext, broken)
    sample_id = _sidecar(lm_shards, BROKEN)["id"]
    message = _assert_skipped(_loader(lm_shards, tokenizer_dir, image_token), caplog, "bad_image", tar, name,
                              sample_id)
    assert "BytesIO" not in message


def test_a_bad_image_in_a_dpo_pair_skips_the_pair(dpo_shards, tokenizer_dir, image_token, caplog):
    ext = _image_ext(dpo_shards, BROKEN)
    tar, name = _overwrite(dpo_shards, BROKEN, ext, b"not an image at all")
    _assert_skipped(_loader(dpo_shards, tokenizer_dir, image_token, mode="dpo"), caplog, "bad_image", tar, name,
                    _sidecar(dpo_shards, BROKEN)["id"])


def test_a_bad_image_is_counted_by_the_rank_that_decodes_it(lm_shards, tokenizer_dir, image_token):
    _overwrite(lm_shards, BROKEN, _image_ext(lm_shards, BROKEN), b"not an image at all")
    trained, bad_images = [], 0
    for rank in range(2):
        loader = _loader(lm_shards, tokenizer_dir, image_token, rank=rank, world_size=2)
        ids, counters, _ = _epoch(loader)
        trained += ids
        bad_images += counters["skipped"].get("bad_image", 0)
        assert counters["samples_read"] == SAMPLES  # the plan is read whole on every rank
    assert bad_images == 1 and sorted(trained) == sorted(set(trained)) and len(trained) == SAMPLES - 1


def test_counters_survive_a_resume(lm_shards, tokenizer_dir, image_token):
    _overwrite(lm_shards, BROKEN, "json", b"garbage")
    loader = _loader(lm_shards, tokenizer_dir, image_token)
    for _ in loader:
        if loader.counters.skipped:
            break
    state = loader.state_dict()
    resumed = _loader(lm_shards, tokenizer_dir, image_token)
    resumed.load_state_dict(state)
    assert resumed.counters.skipped == loader.counters.skipped == {"bad_sidecar": 1}
    assert resumed.counters.samples_read == loader.counters.samples_read > 0


# ----------------------------------------------------------------------------------------------
# A broken shard set: fatal, before the first step, naming the file


def _first_batch(shards, tokenizer_dir, image_token):
    loader = _loader(shards, tokenizer_dir, image_token)
    try:
        return next(iter(loader))
    finally:
        loader.close()


@pytest.mark.parametrize("cut", [0, 1, 40, -2])
def test_a_truncated_manifest_is_fatal(lm_shards, tokenizer_dir, image_token, cut):
    path = lm_shards / MANIFEST
    raw = path.read_bytes()
    path.write_bytes(raw[:cut] if cut >= 0 else raw[:len(raw) // 2])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}.*(not valid JSON|empty)") as info:
        _first_batch(lm_shards, tokenizer_dir, image_token)
    assert "build-shards" in str(info.value)


def test_a_garbage_manifest_is_fatal(lm_shards, tokenizer_dir, image_token):
    path = lm_shards / MANIFEST
    path.write_bytes(np.random.default_rng(2).integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=re.escape(str(path))):
        _first_batch(lm_shards, tokenizer_dir, image_token)


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.pop("shards"), "'shards'"),
    (lambda m: m["shards"][1].pop("index"), r"shards\[1\].*'index'"),
    (lambda m: m["counts"].pop("written"), "'written'"),
    (lambda m: m.update(shards="000000.tar"), "'shards'"),
])
def test_a_manifest_missing_a_key_is_fatal(lm_shards, tokenizer_dir, image_token, edit, expected):
    path = lm_shards / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}.*{expected}"):
        _first_batch(lm_shards, tokenizer_dir, image_token)


@pytest.mark.parametrize("suffix", [".idx", ".tar"])
def test_a_missing_shard_file_is_fatal(lm_shards, tokenizer_dir, image_token, suffix):
    missing = lm_shards / f"000001{suffix}"
    missing.unlink()
    with pytest.raises(DataError, match=rf"{re.escape(str(missing))}: no such file"):
        _first_batch(lm_shards, tokenizer_dir, image_token)


def test_a_truncated_tar_is_fatal(lm_shards, tokenizer_dir, image_token):
    tar = lm_shards / "000001.tar"
    tar.write_bytes(tar.read_bytes()[:1500])
    with pytest.raises(DataError, match=rf"{re.escape(str(tar))}: .*truncated.*member 00000000\d\.\w+"):
        _first_batch(lm_shards, tokenizer_dir, image_token)


def test_a_garbage_index_is_fatal(lm_shards, tokenizer_dir, image_token):
    index = lm_shards / "000001.idx"
    lines = index.read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split()[1], "x1y", 1)
    index.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(index))}:3: "):
        _first_batch(lm_shards, tokenizer_dir, image_token)


# ----------------------------------------------------------------------------------------------
# The config's skip budget (the trainer enforces it)


def test_max_skipped_fraction_is_a_fraction(tokenizer_dir):
    base = dict(shards="s", tokenizer=str(tokenizer_dir))
    assert load_data_config(base).max_skipped_fraction == 0.01
    assert load_data_config({**base, "max_skipped_fraction": 1.0}).max_skipped_fraction == 1.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="data.max_skipped_fraction"):
            load_data_config({**base, "max_skipped_fraction": bad})
