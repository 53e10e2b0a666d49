"""Shard building: counts and reasons in the manifest, contents read back by independent readers."""

import io
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pivot_mega.data.images import dali_unavailable_reason
from pivot_mega.data.shard_builder import BuildOptions, build_shards
from pivot_mega.data.shards import ShardSet
from pivot_mega.data.sources import DataError
from tests.data.helpers import dpo_rows, encode, llava_rows, photo, sentence, write_images, write_json


def _dirty_llava(tmp_path: Path, rng: np.random.Generator):
    """A LLaVA JSON with good samples and one of each kind of bad one; returns (path, expected)."""
    images = tmp_path / "images"
    names = write_images(images, rng, 14)
    rows = llava_rows(rng, names)
    expected = {r["id"]: "ok" for r in rows}
    (images / "trunc.jpg").write_bytes((images / names[0]).read_bytes()[:200])
    (images / "garbage.jpg").write_bytes(bytes(rng.integers(0, 256, 500, dtype=np.uint8)))
    (images / "empty.png").write_bytes(b"")
    (images / "rgba.png").write_bytes(encode(photo(rng, 30, 40), "PNG", mode="RGBA"))

    def conv(question="<image>\nwhat?", answer="a cat"):
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    bad = [
        ({"id": "missing", "image": "nope.jpg", "conversations": conv()}, "missing_image"),
        ({"id": "trunc", "image": "trunc.jpg", "conversations": conv()}, "corrupt_image"),
        ({"id": "garbage", "image": "garbage.jpg", "conversations": conv()}, "corrupt_image"),
        ({"id": "empty", "image": "empty.png", "conversations": conv()}, "corrupt_image"),
        ({"id": "noplace", "image": names[1], "conversations": conv("what?")}, "image_placeholder_mismatch"),
        ({"id": "inreply", "image": names[1], "conversations": conv(answer="<image>")}, "image_in_response"),
        ({"id": "noreply", "image": names[1], "conversations": conv(answer="")}, "empty_text"),
        ({"id": "role", "image": names[1], "conversations": [{"from": "bot", "value": "<image>"}]}, "malformed_row"),
        ({"id": "utf8", "image": names[1], "conversations": conv(answer="@BAD@")}, "non_utf8"),
        ({"id": "textonly", "conversations": conv("hello", "hi")}, "ok"),
        ({"id": "two", "image": [names[2], names[3]], "conversations": conv("<image> vs <image>")}, "ok"),
        ({"id": "rgba", "image": "rgba.png", "conversations": conv()}, "ok"),
    ]
    rows += [row for row, _ in bad]
    expected.update({row["id"]: reason for row, reason in bad})
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    text = "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"  # row k on line k + 2
    (tmp_path / "llava.json").write_bytes(text.encode().replace(b"@BAD@", b"\xc3\x28"))
    lines = {r["id"]: k + 2 for k, r in enumerate(rows)}
    return tmp_path / "llava.json", images, [r["id"] for r in rows], expected, lines


def test_llava_shards_manifest_counts_and_reasons(tmp_path, seed):
    rng = np.random.default_rng(seed)
    source, images, order, expected, lines = _dirty_llava(tmp_path, rng)
    manifest = build_shards("llava", source, tmp_path / "out", images,
                            BuildOptions(samples_per_shard=4, workers=2, progress=False))
    good = [i for i in order if expected[i] == "ok"]
    counts = manifest["counts"]
    assert counts["rows"] == len(order) and counts["written"] == len(good) == counts["conversations"]
    assert counts["skipped_by_reason"] == dict(Counter(r for r in expected.values() if r != "ok"))
    assert counts["images"] == len(good) + 1 - 1  # "two" has two images, "textonly" none
    assert {(s["sample_id"], s["line"], s["reason"]) for s in manifest["skipped"]} == {
        (i, lines[i], r) for i, r in expected.items() if r != "ok"}
    assert all(s["source"] == str(source) for s in manifest["skipped"])
    assert [c["sample_id"] for c in manifest["converted"]] == ["rgba"]
    assert manifest["converted"][0]["from"] == "PNG RGBA"
    full, rest = divmod(len(good), 4)
    assert [s["samples"] for s in manifest["shards"]] == [4] * full + ([rest] if rest else [])

    # An independent reader (the webdataset package) sees the samples in input order with the original bytes.
    import webdataset

    urls = [str(tmp_path / "out" / s["tar"]) for s in manifest["shards"]]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert [json.loads(s["json"])["id"] for s in samples] == good
    rows = {r["id"]: r for r in json.loads(source.read_bytes().decode("utf-8", "replace"))}
    for s in samples:
        sidecar = json.loads(s["json"])
        row = rows[sidecar["id"]]
        assert sidecar["conversations"] == row["conversations"] and sidecar["line"] == lines[sidecar["id"]]
        files = [row["image"]] if isinstance(row.get("image"), str) else row.get("image", [])
        assert sidecar["image_files"] == files and len(sidecar["images"]) == len(files)
        for member, name in zip(sidecar["images"], files):
            if sidecar["id"] == "rgba":  # converted: same pixels as PIL's convert("RGB"), as PNG
                original = np.asarray(Image.open(images / name).convert("RGB"))
                assert member == "png" and np.array_equal(np.asarray(Image.open(io.BytesIO(s[member]))), original)
            else:
                assert s[member] == (images / name).read_bytes()

    # The DALI index of every shard points at exactly the tar members.
    shard_set = ShardSet(tmp_path / "out")
    assert len(shard_set) == len(good)
    for k, s in enumerate(samples):
        assert shard_set.read(shard_set.samples[k]["json"]) == s["json"]
        for member in json.loads(s["json"])["images"]:
            assert shard_set.image_bytes(k, member) == s[member]


def test_strict_stops_at_the_first_bad_sample(tmp_path, seed):
    rng = np.random.default_rng(seed)
    source, images, order, expected, lines = _dirty_llava(tmp_path, rng)
    first_bad = next(i for i in order if expected[i] != "ok")
    with pytest.raises(DataError) as error:
        build_shards("llava", source, tmp_path / "out", images, BuildOptions(strict=True, workers=1, progress=False))
    assert str(error.value).startswith(f"{source}:{lines[first_bad]}: sample {first_bad!r}: {expected[first_bad]}")
    assert list((tmp_path / "out").iterdir()) == []  # nothing half-built is left behind


def test_same_shards_for_any_worker_count(tmp_path, seed):
    rng = np.random.default_rng(seed)
    source, images, *_ = _dirty_llava(tmp_path, rng)
    for workers in (1, 2):
        build_shards("llava", source, tmp_path / f"w{workers}", images,
                     BuildOptions(samples_per_shard=5, workers=workers, progress=False))
    files = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "w2").iterdir())
    for name in files:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_shards_close_at_the_size_limit(tmp_path, seed):
    rng = np.random.default_rng(seed)
    names = write_images(tmp_path / "img", rng, 12)
    write_json(tmp_path / "a.json", llava_rows(rng, names))
    limit_mb = 0.012
    manifest = build_shards("llava", tmp_path / "a.json", tmp_path / "out", tmp_path / "img",
                            BuildOptions(shard_size_mb=limit_mb, workers=1, progress=False))
    assert len(manifest["shards"]) > 1 and sum(s["samples"] for s in manifest["shards"]) == 12
    shard_set = ShardSet(tmp_path / "out")
    payload = Counter()
    for entry in shard_set.samples:
        members = list(entry.values())
        payload[members[0].shard] += sum(m.size for m in members)
    # Each shard stays under the limit, or holds a single sample that alone is larger.
    for number, shard in enumerate(manifest["shards"]):
        assert payload[number] <= limit_mb * 2**20 or shard["samples"] == 1


def test_unusual_images_are_stored_as_rgb_png(tmp_path, seed):
    rng = np.random.default_rng(seed)
    array = photo(rng, 33, 47)
    files = {"p.png": encode(array, "PNG", mode="P"), "la.png": encode(array, "PNG", mode="LA"),
             "cmyk.jpg": encode(array, "JPEG", mode="CMYK"), "g.gif": encode(array, "GIF"),
             "i16.png": encode((array[..., 0].astype(np.uint16) * 257), "PNG"), "b.bmp": encode(array, "BMP"),
             "w.webp": encode(array, "WEBP", lossless=True), "gray.png": encode(array, "PNG", mode="L")}
    (tmp_path / "img").mkdir()
    rows = []
    for name, data in files.items():
        (tmp_path / "img" / name).write_bytes(data)
        rows.append({"id": name, "image": name, "conversations": [{"from": "human", "value": "<image>"},
                                                                   {"from": "gpt", "value": "x"}]})
    write_json(tmp_path / "a.json", rows)
    manifest = build_shards("llava", tmp_path / "a.json", tmp_path / "out", tmp_path / "img",
                            BuildOptions(workers=1, progress=False))
    converted = {c["sample_id"]: c["from"] for c in manifest["converted"]}
    assert converted == {"p.png": "PNG P", "la.png": "PNG LA", "cmyk.jpg": "JPEG CMYK", "g.gif": "GIF P",
                         "i16.png": "PNG I;16", "b.bmp": "BMP RGB"}
    shard_set = ShardSet(tmp_path / "out")
    for k, name in enumerate(files):
        sidecar = shard_set.sidecar(k)
        (member,) = sidecar["images"]
        stored = shard_set.image_bytes(k, member)
        if name in converted:
            with Image.open(tmp_path / "img" / name) as original:
                expected = np.asarray(original.convert("RGB"))
            assert member == "png" and np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), expected)
        else:
            assert stored == files[name] and member == name.rsplit(".", 1)[1]


def _mmpr(tmp_path: Path, rng: np.random.Generator):
    root = tmp_path / "MMPR-v1.2"
    meta = {}
    for f, name in enumerate(("chartqa", "geo")):
        rows = []
        for i in range(int(rng.integers(15, 30))):
            image = f"{i}.jpg"
            (root / "images" / name).mkdir(parents=True, exist_ok=True)
            (root / "images" / name / image).write_bytes(encode(photo(rng, 20, 24), "JPEG"))
            row = {"image": image, "question": sentence(rng, 2, 30) + "?", "chosen": sentence(rng, 1, 40),
                   "rejected": sentence(rng, 1, 40)}
            if rng.random() < 0.5:
                row["question"] = "<image>\n" + row["question"]
            if rng.random() < 0.1:
                row["image"] = [image, image]
            if rng.random() < 0.1:
                row["rejected"] += " <image>"
            if i == 3:  # a .gif name whose file is the .jpg next to it (PIVOT reads those)
                row["image"] = f"{i}.gif"
            while row["rejected"] == row["chosen"]:
                row["rejected"] = sentence(rng, 1, 40)
            rows.append(row)
        write_json(root / "annotations" / f"{name}.jsonl", rows, jsonl=True)
        meta[name] = {"root": f"images/{name}", "annotation": f"annotations/{name}.jsonl", "length": len(rows)}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _pivot_selection(root: Path, tokenizer, seed: int, size: int, limit: int) -> list[str]:
    """PIVOT's datasets/data-processor/mpo-make_jsons.py, reduced to the decisions it makes."""
    meta = json.loads((root / "meta.json").read_text())
    items = []
    for info in meta.values():
        path = root / info["annotation"]
        for line, text in enumerate(path.read_text().splitlines(), start=1):
            item = json.loads(text)
            if isinstance(item["image"], list):
                continue
            items.append((item, info["root"], f"{path.name}:{line}"))
    random.seed(seed)
    random.shuffle(items)
    kept = []
    for item, prefix, sample_id in items:
        image = item["image"][:-4] + ".jpg" if item["image"].endswith(".gif") else item["image"]
        if not (root / prefix / image).exists():
            continue
        prompt = item["question"] if "<image>" in item["question"] else f"<image>\n{item['question']}"
        if "<image>" in item["chosen"] or "<image>" in item["rejected"]:
            continue
        if len(tokenizer.encode(f"{prompt} {item['chosen']}".strip(), add_special_tokens=False)) > limit:
            continue
        kept.append(sample_id)
        if len(kept) >= size:
            break
    return kept


def test_mmpr_selection_follows_pivot(tmp_path, tokenizer_dir, seed):
    from transformers import AutoTokenizer

    rng = np.random.default_rng(seed)
    root = _mmpr(tmp_path, rng)
    size, limit, selection_seed = int(rng.integers(5, 20)), int(rng.integers(20, 40)), int(rng.integers(0, 1000))
    manifest = build_shards("mmpr", root / "meta.json", tmp_path / "out", options=BuildOptions(
        max_samples=size, seed=selection_seed, tokenizer=str(tokenizer_dir), max_prompt_chosen_tokens=limit,
        workers=2, progress=False))
    expected = _pivot_selection(root, AutoTokenizer.from_pretrained(tokenizer_dir), selection_seed, size, limit)
    shard_set = ShardSet(tmp_path / "out")
    assert [shard_set.sidecar(i)["id"] for i in range(len(shard_set))] == expected
    counts = manifest["counts"]
    assert counts["written"] == counts["pairs"] == len(expected)
    assert counts["rows"] == counts["written"] + counts["skipped"] + counts["not_sampled"]
    assert set(counts["skipped_by_reason"]) <= {"multi_image", "image_in_response", "over_token_budget"}
    gif = [shard_set.sidecar(i) for i in range(len(shard_set)) if shard_set.sidecar(i)["image_files"] == ["3.jpg"]]
    assert all(s["id"].endswith(":4") for s in gif)


def test_dpo_and_mixture_shards(tmp_path, seed):
    rng = np.random.default_rng(seed)
    names = write_images(tmp_path / "img", rng, 10)
    pairs = dpo_rows(rng, names)
    pairs[0]["rejected"] = pairs[0]["chosen"]
    write_json(tmp_path / "dpo.json", pairs)
    write_json(tmp_path / "llava.jsonl", llava_rows(rng, names), jsonl=True)
    manifest = build_shards("dpo", tmp_path / "dpo.json", tmp_path / "dpo", tmp_path / "img",
                            BuildOptions(workers=1, progress=False))
    assert manifest["counts"]["pairs"] == 9 and manifest["counts"]["skipped_by_reason"] == {"identical_pair": 1}
    (tmp_path / "mix.yaml").write_text("- json_path: dpo.json\n  kind: dpo\n  sampling_strategy: first:4\n"
                                       "- json_path: llava.jsonl\n  sampling_strategy: 30%\n")
    manifest = build_shards("mixture", tmp_path / "mix.yaml", tmp_path / "mix", tmp_path / "img",
                            BuildOptions(workers=1, progress=False, seed=5))
    assert [m["selected"] for m in manifest["mixture"]] == [4, 3]
    assert manifest["counts"]["pairs"] == 3 and manifest["counts"]["conversations"] == 3
    assert manifest["counts"]["skipped_by_reason"] == {"identical_pair": 1}
    with pytest.raises(DataError, match="output directory is not empty"):
        build_shards("dpo", tmp_path / "dpo.json", tmp_path / "dpo", tmp_path / "img", BuildOptions(progress=False))


def test_command_line(tmp_path, seed):
    rng = np.random.default_rng(seed)
    source, images, order, expected, _ = _dirty_llava(tmp_path, rng)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pivot_mega.cli", "data", "build-shards", *map(str, args)],
                              capture_output=True, text=True, timeout=300)

    done = cli("--kind", "llava", "--input", source, "--image-root", images, "--out", tmp_path / "out",
               "--samples-per-shard", 3, "--workers", 2)
    assert done.returncode == 0, done.stderr
    good = sum(1 for r in expected.values() if r == "ok")
    assert f"wrote {good} samples" in done.stdout and "manifest (every skipped sample" in done.stdout
    for reason, n in Counter(r for r in expected.values() if r != "ok").items():
        assert f"skipped {n:>8}  {reason}" in done.stdout
    done = cli("--kind", "llava", "--input", source, "--image-root", images, "--out", tmp_path / "strict", "--strict")
    assert done.returncode == 2 and f"{source}:" in done.stderr and "Traceback" not in done.stderr
    script = Path(__file__).parents[2] / "tools" / "build_shards.py"
    done = subprocess.run([sys.executable, script, "--kind", "dpo", "--input", tmp_path / "missing.json",
                           "--out", tmp_path / "x"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "missing.json: no such file" in done.stderr


@pytest.mark.skipif(dali_unavailable_reason() is not None, reason=str(dali_unavailable_reason()))
def test_dali_webdataset_reader_reads_our_shards(tmp_path, seed):
    from nvidia.dali import fn, pipeline_def

    rng = np.random.default_rng(seed)
    source, images, *_ = _dirty_llava(tmp_path, rng)
    manifest = build_shards("llava", source, tmp_path / "out", images,
                            BuildOptions(samples_per_shard=4, workers=1, progress=False))
    shard_set = ShardSet(tmp_path / "out")
    out = tmp_path / "out"

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipeline():
        return tuple(fn.readers.webdataset(paths=[str(out / s["tar"]) for s in manifest["shards"]],
                                     index_paths=[str(out / s["index"]) for s in manifest["shards"]],
                                     ext=["json", "jpg;png;0.jpg;0.png"], missing_component_behavior="empty"))

    pipe = pipeline()
    pipe.build()
    for k in range(len(shard_set)):
        sidecar_bytes, image_bytes = (np.array(t.at(0)).tobytes() for t in pipe.run())
        sidecar = json.loads(sidecar_bytes)
        assert sidecar == shard_set.sidecar(k)
        first = sidecar["images"][0] if sidecar["images"] else None
        assert image_bytes == (shard_set.image_bytes(k, first) if first else b"")
