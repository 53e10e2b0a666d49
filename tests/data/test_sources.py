"""Input readers: line numbers, validation reasons, sampling strategies, mixtures, MMPR meta files."""

import json
from collections import Counter

import numpy as np
import pytest

from pivot_mega.data.sources import (DataError, Row, Sample, Skip, read_json_rows, read_mixture, rows_from_mixture,
                                     rows_from_mmpr, sample_indices, validate)
from tests.data.helpers import dpo_rows, llava_rows, write_json


def test_json_array_rows_carry_their_line_numbers(tmp_path, seed):
    rng = np.random.default_rng(seed)
    rows = llava_rows(rng, [f"{i}.jpg" for i in range(15)])
    text, lines, line = "[", [], 1
    for i, row in enumerate(rows):
        gap = "\n" * int(rng.integers(0, 3))
        dumped = json.dumps(row, indent=int(rng.integers(0, 3)) or None)
        text += gap + ("\n" if i == 0 else ",\n")
        line += gap.count("\n") + 1
        lines.append(line)
        text += dumped
        line += dumped.count("\n")
    (tmp_path / "a.json").write_text(text + "\n]\n")
    values, skips = read_json_rows(tmp_path / "a.json")
    assert skips == [] and [v for _, v in values] == rows and [n for n, _ in values] == lines


def test_broken_json_array_names_line_and_column(tmp_path):
    (tmp_path / "a.json").write_text('[\n {"id": 1},\n {"id": 2,,}\n]')
    with pytest.raises(DataError, match=r"a\.json:3:11: not valid JSON"):
        read_json_rows(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match="expected a JSON array"):
        read_json_rows(tmp_path / "b.json")


def test_malformed_jsonl_line_is_skipped_with_its_line(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"id": "a"}\n\n{"id": "b", \n{"id": "c"}\n')
    values, skips = read_json_rows(tmp_path / "a.jsonl")
    assert values == [(1, {"id": "a"}), (4, {"id": "c"})]
    assert [(s.line, s.reason) for s in skips] == [(3, "malformed_json")]


def _row(data, kind="llava", line=7):
    return Row("src.json", line, data, kind, "/images")


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


@pytest.mark.parametrize("data, kind, reason", [
    (["not", "an", "object"], "llava", "malformed_row"),
    ({"id": 1, "image": "a.jpg"}, "llava", "malformed_row"),
    ({"id": 1, "image": "a.jpg", "conversations": [{"from": "robot", "value": "<image>"}]}, "llava", "malformed_row"),
    ({"id": 1, "image": 5, "conversations": _turns("<image>x", "y")}, "llava", "malformed_row"),
    ({"id": 1, "image": "a.jpg", "conversations": _turns("x", "y")}, "llava", "image_placeholder_mismatch"),
    ({"id": 1, "image": "a.jpg", "conversations": _turns("<image><image>x", "y")}, "llava",
     "image_placeholder_mismatch"),
    ({"id": 1, "conversations": _turns("<image>x", "y")}, "llava", "image_placeholder_mismatch"),
    ({"id": 1, "image": "a.jpg", "conversations": _turns("<image>x", "see <image>")}, "llava", "image_in_response"),
    ({"id": 1, "image": "a.jpg", "conversations": _turns("<image>x", "  ")}, "llava", "empty_text"),
    ({"id": 1, "image": "a.jpg", "conversations": _turns("<image>x", "y\udcff")}, "llava", "non_utf8"),
    ({"id": 1, "image": "a.jpg", "prompt": "x", "chosen": "a", "rejected": " a "}, "dpo", "identical_pair"),
    ({"id": 1, "image": "a.jpg", "prompt": "x", "chosen": "", "rejected": "b"}, "dpo", "empty_text"),
    ({"id": 1, "image": "a.jpg", "prompt": "x", "chosen": "a", "rejected": "<image> b"}, "dpo", "image_in_response"),
    ({"id": 1, "image": "a.jpg", "prompt": "x <image> <image>", "chosen": "a", "rejected": "b"}, "dpo",
     "image_placeholder_mismatch"),
    ({"id": 1, "image": "a.jpg", "prompt": 3, "chosen": "a", "rejected": "b"}, "dpo", "malformed_row"),
    ({"image": "a.jpg", "question": "q", "chosen": "a"}, "mmpr", "malformed_row"),
])
def test_bad_rows_are_skipped_with_their_reason(data, kind, reason):
    skip = validate(_row(data, kind))
    assert isinstance(skip, Skip) and skip.reason == reason, skip
    assert skip.source == "src.json" and skip.line == 7
    assert skip.sample_id == ("1" if isinstance(data, dict) and "id" in data else "src.json:7")
    assert skip.message().startswith(f"src.json:7: sample {skip.sample_id!r}: {reason}: ")


def test_good_rows_become_samples():
    sample = validate(_row({"id": "a", "image": ["x.jpg", "y.png"],
                            "conversations": _turns("<image> and <image>", "b")}))
    assert isinstance(sample, Sample) and sample.image_paths == ["/images/x.jpg", "/images/y.png"]
    assert sample.text["type"] == "conversation" and sample.text["image_files"] == ["x.jpg", "y.png"]
    text_only = validate(_row({"id": "t", "conversations": _turns("hi", "hello")}))
    assert isinstance(text_only, Sample) and text_only.image_paths == []
    # A pair's missing placeholder of its single image goes in front (PIVOT, InternVL).
    pair = validate(_row({"image": "a.jpg", "question": "what?", "chosen": "a", "rejected": "b"}, kind="mmpr"))
    assert pair.text["prompt"] == "<image>\nwhat?" and pair.sample_id == "src.json:7"


def test_non_utf8_bytes_skip_only_their_sample(tmp_path):
    rows = [{"id": i, "conversations": _turns("q", f"answer @{i}@")} for i in range(4)]
    raw = json.dumps(rows, indent=1).encode().replace(b"@2@", b"\xff\xfe")
    (tmp_path / "a.json").write_bytes(raw)
    values, _ = read_json_rows(tmp_path / "a.json")
    results = [validate(Row("a.json", line, v, "llava", str(tmp_path))) for line, v in values]
    assert [r.reason if isinstance(r, Skip) else "ok" for r in results] == ["ok", "ok", "non_utf8", "ok"]


def test_sampling_strategies(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 500))
    k = int(rng.integers(1, n))
    assert sample_indices("all", n, "s", "w") == list(range(n))
    assert sample_indices(f"first:{k}", n, "s", "w") == list(range(k))
    assert sample_indices(f"end:{k}", n, "s", "w") == list(range(n - k, n))
    assert sample_indices(f"first:{n + 5}", n, "s", "w") == list(range(n))
    drawn = sample_indices(f"random:{k}", n, f"{seed}:0", "w")
    assert len(set(drawn)) == k and drawn == sorted(drawn)
    assert drawn == sample_indices(f"random:{k}", n, f"{seed}:0", "w")
    assert drawn != sample_indices(f"random:{k}", n, f"{seed + 1}:0", "w") or k == n
    percent = float(rng.integers(1, 100)) + 0.5
    expected = int(np.ceil(percent * n / 100))
    assert len(sample_indices(f"{percent}%", n, "s", "w")) == expected
    assert sample_indices(f"first:{percent}%", n, "s", "w") == list(range(expected))
    for bad in ("some", "first:x", "middle:3", "17", "first:120%"):
        with pytest.raises(DataError, match=f"w: sampling_strategy {bad!r}"):
            sample_indices(bad, n, "s", "w")


def test_mixture_entries_with_their_own_roots_and_kinds(tmp_path, seed):
    rng = np.random.default_rng(seed)
    write_json(tmp_path / "a" / "llava.json", llava_rows(rng, [f"{i}.jpg" for i in range(20)]))
    write_json(tmp_path / "b" / "dpo.jsonl", dpo_rows(rng, [f"{i}.jpg" for i in range(30)]), jsonl=True)
    (tmp_path / "mix.yaml").write_text(
        "datasets:\n"
        "  - json_path: a/llava.json\n    sampling_strategy: end:5\n"
        "  - json_path: b/dpo.jsonl\n    sampling_strategy: random:10%\n    kind: dpo\n    image_root: img_b\n")
    rows, skips, report = rows_from_mixture(tmp_path / "mix.yaml", tmp_path / "img", seed=3)
    assert skips == [] and [r["selected"] for r in report] == [5, 3]
    assert [r.line for r in rows[:5]] == [r.line for r in rows_from_mixture(tmp_path / "mix.yaml", "x", 4)[0][:5]]
    assert Counter((r.kind, r.image_base) for r in rows) == {("llava", str(tmp_path / "img")): 5,
                                                             ("dpo", str(tmp_path / "img_b")): 3}
    (tmp_path / "bad.yaml").write_text("- json_path: a/llava.json\n  sampling: all\n")
    with pytest.raises(DataError, match=r"bad\.yaml: entry 0: unknown key\(s\) \['sampling'\]"):
        read_mixture(tmp_path / "bad.yaml")


def test_mmpr_meta_resolves_paths_and_skips_multi_image_items(tmp_path):
    root = tmp_path / "MMPR"
    write_json(root / "ann" / "a.jsonl", [
        {"image": "x/1.jpg", "question": "q1", "chosen": "a", "rejected": "b"},
        {"image": ["x/1.jpg", "x/2.jpg"], "question": "q2 <image> <image>", "chosen": "a", "rejected": "b"},
        {"image": ["x/3.jpg"], "question": "q3", "chosen": "a", "rejected": "b"}], jsonl=True)
    write_json(root / "ann" / "b.jsonl", [{"question": "text only", "chosen": "a", "rejected": "b"}], jsonl=True)
    (root / "meta.json").write_text(json.dumps({"A": {"root": "images/a", "annotation": "ann/a.jsonl"},
                                                "B": {"root": "images/b", "annotation": "ann/b.jsonl"}}))
    rows, skips = rows_from_mmpr(root / "meta.json")
    assert [(r.source, r.line, r.image_base) for r in rows] == [
        (str(root / "ann/a.jsonl"), 1, str(root / "images/a")), (str(root / "ann/a.jsonl"), 3, str(root / "images/a")),
        (str(root / "ann/b.jsonl"), 1, str(root / "images/b"))]
    assert [(s.line, s.reason) for s in skips] == [(2, "multi_image")]
    rows, _ = rows_from_mmpr(root / "meta.json", image_root=tmp_path / "elsewhere")
    assert rows[0].image_base == str(tmp_path / "elsewhere/images/a")
    (root / "meta.json").write_text(json.dumps({"A": {"root": "r", "annotation": "ann/missing.jsonl"}}))
    with pytest.raises(DataError, match=r"entry 'A': annotation .*missing\.jsonl does not exist"):
        rows_from_mmpr(root / "meta.json")
