"""Input datasets → validated samples: LLaVA JSON, PIVOT DPO JSON, MMPR (meta.json + JSONL), mixtures.

Every row either becomes a ``Sample`` or a ``Skip`` that names its file, line, sample id and reason;
nothing is dropped without a record. Images are only located here; ``shard_builder.py`` reads and verifies
them.

Formats (see DESIGN.md, "Data contracts"):
  LLaVA   ``[{id, image, conversations: [{from: human|gpt, value}, ...]}]`` (.json array or .jsonl)
  DPO     ``[{id, image, prompt, chosen, rejected}]``
  MMPR    ``meta.json`` ``{name: {root, annotation, ...}}``; each annotation a JSONL of
          ``{image, question, chosen, rejected}``; paths relative to meta.json's directory
  mixture YAML list (or ``{datasets: [...]}``) of ``{json_path, sampling_strategy, [image_root], [kind]}``
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

import yaml

IMAGE_PLACEHOLDER = "<image>"
USER_ROLES = {"human": "user", "user": "user"}
ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant"}
SYSTEM_ROLES = {"system": "system"}
ROLES = {**USER_ROLES, **ASSISTANT_ROLES, **SYSTEM_ROLES}
SOURCE_KINDS = ("llava", "dpo", "mmpr")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, line and sample id."""


@dataclasses.dataclass(frozen=True)
class Skip:
    """A sample left out, and why. ``line`` is 1-based (0 when the sample has no line of its own)."""

    source: str
    line: int
    sample_id: str
    reason: str
    detail: str

    def message(self) -> str:
        return f"{self.source}:{self.line}: sample {self.sample_id!r}: {self.reason}: {self.detail}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Row:
    """One parsed input record, not yet validated."""

    source: str
    line: int
    data: Any
    kind: str  # llava | dpo | mmpr
    image_base: str  # directory the row's image paths are relative to


@dataclasses.dataclass
class Sample:
    """A validated sample: its text fields as stored in the shard sidecar, and its image files."""

    sample_id: str
    source: str
    line: int
    text: dict  # {"type": "conversation", "conversations": [...]} or {"type": "pair", ...}
    image_paths: list[str]

    @property
    def is_pair(self) -> bool:
        return self.text["type"] == "pair"


# ----------------------------------------------------------------------------------------------
# JSON / JSONL with line numbers


def _decode_utf8(raw: bytes) -> str:
    # Bad bytes become lone surrogates, so one broken string skips its sample, not the whole file.
    text = raw.decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def read_json_rows(path: str | Path) -> tuple[list[tuple[int, Any]], list[Skip]]:
    """``[(line, value)]`` of a JSON array (one per element) or a JSONL file (one per line).

    A JSONL line that is not JSON becomes a Skip (reason ``malformed_json``); a JSON array that is
    not valid JSON cannot be split into samples and raises DataError with line and column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = _decode_utf8(path.read_bytes())
    if path.suffix == ".jsonl":
        return _read_jsonl(text, str(path))
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if not text.startswith("[", pos):
        raise DataError(f"{path}: expected a JSON array of samples (or use a .jsonl file)")
    rows, line, counted = [], 1, 0
    pos += 1
    while True:
        pos = _skip_ws(text, pos)
        if text.startswith("]", pos):
            break
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
        rows.append((line, value))
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            lineno = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}:{lineno}: expected ',' or ']' after the sample starting on line {line}")
    return rows, []


def _read_jsonl(text: str, source: str) -> tuple[list[tuple[int, Any]], list[Skip]]:
    rows, skips = [], []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            skips.append(Skip(source, lineno, "", "malformed_json", f"column {e.colno}: {e.msg}"))
    return rows, skips


# ----------------------------------------------------------------------------------------------
# Readers per input kind


def rows_from_file(path: str | Path, kind: str, image_root: str | Path) -> tuple[list[Row], list[Skip]]:
    """Rows of a LLaVA or DPO JSON/JSONL file; image paths relative to ``image_root``."""
    if kind not in ("llava", "dpo"):
        raise DataError(f"{path}: kind {kind!r} is read from a JSON file only for 'llava' or 'dpo'")
    values, skips = read_json_rows(path)
    return [Row(str(path), line, value, kind, str(image_root)) for line, value in values], skips


def rows_from_mmpr(meta_path: str | Path, image_root: str | Path | None = None) -> tuple[list[Row], list[Skip]]:
    """Rows of every annotation named by an MMPR ``meta.json``, in meta order.

    Annotation paths are relative to meta.json's directory; image paths to ``image_root`` (default:
    that directory) joined with the entry's ``root``. Items with several images are skipped
    (``multi_image``), as PIVOT's selection does, before any sampling.
    """
    meta_path = Path(meta_path)
    base = meta_path.parent
    try:
        meta = json.loads(_decode_utf8(meta_path.read_bytes()))
    except FileNotFoundError:
        raise DataError(f"{meta_path}: no such file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected an object {{name: {{root, annotation}}}}")
    rows, skips = [], []
    for name, entry in meta.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("annotation"), str):
            raise DataError(f"{meta_path}: entry {name!r} needs an 'annotation' path")
        root = entry.get("root", "")
        if not isinstance(root, str):
            raise DataError(f"{meta_path}: entry {name!r}: 'root' must be a path, got {root!r}")
        annotation = base / entry["annotation"]
        if not annotation.is_file():
            raise DataError(f"{meta_path}: entry {name!r}: annotation {annotation} does not exist")
        values, file_skips = read_json_rows(annotation)
        skips += file_skips
        image_base = Path(image_root if image_root is not None else base) / root
        for line, value in values:
            if isinstance(value, dict) and isinstance(value.get("image"), list) and len(value["image"]) > 1:
                skips.append(Skip(str(annotation), line, _sample_id(value, annotation, line), "multi_image",
                                  f"{len(value['image'])} images; PIVOT's selection keeps single-image items"))
                continue
            rows.append(Row(str(annotation), line, value, "mmpr", str(image_base)))
    return rows, skips


@dataclasses.dataclass
class MixtureEntry:
    json_path: str
    sampling_strategy: str = "all"
    image_root: str | None = None
    kind: str = "llava"


def read_mixture(path: str | Path) -> list[MixtureEntry]:
    """Entries of a mixture YAML (a list, or LLaVA-NeXT's ``{datasets: [...]}``); paths made absolute."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {e}") from None
    if isinstance(data, dict) and set(data) == {"datasets"}:
        data = data["datasets"]
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a list of {{json_path, sampling_strategy}} entries")
    fields = {f.name for f in dataclasses.fields(MixtureEntry)}
    entries = []
    for i, item in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(item, dict) or not isinstance(item.get("json_path"), str):
            raise DataError(f"{where}: needs a 'json_path' string, got {item!r}")
        unknown = sorted(set(item) - fields)
        if unknown:
            raise DataError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
        entry = MixtureEntry(**{k: str(v) if v is not None else None for k, v in item.items()})
        if entry.kind not in ("llava", "dpo"):
            raise DataError(f"{where}: kind {entry.kind!r} is not 'llava' or 'dpo'")
        entry.json_path = str(path.parent / entry.json_path)
        if entry.image_root is not None:
            entry.image_root = str(path.parent / entry.image_root)
        parse_strategy(entry.sampling_strategy, where)
        entries.append(entry)
    return entries


def parse_strategy(text: str, where: str) -> tuple[str, float | None, bool]:
    """``all | first:N | end:N | random:N`` (N a count or ``P%``), or a bare ``P%`` (random P%).

    Returns (method, number, is_percent).
    """
    text = text.strip()
    if text == "all":
        return "all", None, False
    method, _, number = text.rpartition(":") if ":" in text else ("random", "", text)
    if method not in ("first", "end", "random") or (":" not in text and not number.endswith("%")):
        raise DataError(f"{where}: sampling_strategy {text!r} is not all, first:N, end:N, random:N or N%")
    percent = number.endswith("%")
    try:
        value = float(number[:-1]) if percent else int(number)
    except ValueError:
        raise DataError(f"{where}: sampling_strategy {text!r}: {number!r} is not a number") from None
    if value < 0 or (percent and value > 100):
        raise DataError(f"{where}: sampling_strategy {text!r} is out of range")
    return method, value, percent


def sample_indices(strategy: str, num_rows: int, rng_key: str, where: str) -> list[int]:
    """Row indices a sampling strategy keeps, in file order. Percentages round up (LLaVA-NeXT).

    ``random`` draws with ``random.Random(rng_key)``: a string seed hashes the same in every process
    and Python version.
    """
    method, value, percent = parse_strategy(strategy, where)
    if method == "all":
        return list(range(num_rows))
    count = min(num_rows, math.ceil(value * num_rows / 100) if percent else int(value))
    if method == "first":
        return list(range(count))
    if method == "end":
        return list(range(num_rows - count, num_rows))
    return sorted(random.Random(rng_key).sample(range(num_rows), count))


def rows_from_mixture(path: str | Path, image_root: str | Path, seed: int) -> tuple[list[Row], list[Skip], list[dict]]:
    """Rows of every mixture entry after its sampling strategy; also a per-entry report."""
    rows, skips, report = [], [], []
    for i, entry in enumerate(read_mixture(path)):
        entry_rows, entry_skips = rows_from_file(entry.json_path, entry.kind, entry.image_root or image_root)
        keep = sample_indices(entry.sampling_strategy, len(entry_rows), f"{seed}:{i}", f"{path}: entry {i}")
        rows += [entry_rows[k] for k in keep]
        skips += entry_skips
        report.append({"json_path": entry.json_path, "kind": entry.kind, "sampling_strategy": entry.sampling_strategy,
                       "rows": len(entry_rows), "selected": len(keep)})
    return rows, skips, report


# ----------------------------------------------------------------------------------------------
# Validation


def _sample_id(data: Any, source: str | Path, line: int) -> str:
    if isinstance(data, dict) and isinstance(data.get("id"), (str, int)) and not isinstance(data.get("id"), bool):
        return str(data["id"])
    return f"{Path(source).name}:{line}"


def _bad_text(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _images(data: dict) -> list[str] | None:
    image = data.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image] if image else None
    if isinstance(image, list) and image and all(isinstance(p, str) and p for p in image):
        return list(image)
    return None


def image_first(text: str) -> str:
    """A single ``<image>`` moved to the front as ``<image>\\n``, as LLaVA and PIVOT render prompts."""
    return IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()


def validate(row: Row) -> Sample | Skip:
    """A Sample, or a Skip naming the first problem (malformed_row, non_utf8, empty_text, ...)."""
    sample_id = _sample_id(row.data, row.source, row.line)

    def skip(reason: str, detail: str) -> Skip:
        return Skip(row.source, row.line, sample_id, reason, detail)

    data = row.data
    if not isinstance(data, dict):
        return skip("malformed_row", f"expected an object, got {type(data).__name__}")
    if _bad_text(data):
        return skip("non_utf8", "text is not valid UTF-8")
    images = _images(data)
    if images is None:
        return skip("malformed_row", f"'image' must be a path or a list of paths, got {data.get('image')!r}")
    if row.kind == "mmpr" and images and images[0].endswith(".gif"):
        # PIVOT's selection reads MMPR's .gif entries from .jpg files next to them.
        gif_jpg = images[0][:-4] + ".jpg"
        if not (Path(row.image_base) / images[0]).exists() and (Path(row.image_base) / gif_jpg).exists():
            images = [gif_jpg]
    image_paths = [str(Path(row.image_base) / p) for p in images]
    result = validate_text(data, row.kind, len(images))
    if isinstance(result, tuple):
        return skip(*result)
    result["image_files"] = images
    return Sample(sample_id, row.source, row.line, result, image_paths)


def validate_text(data: dict, kind: str, num_images: int) -> dict | tuple[str, str]:
    """The text fields of a sample as a shard sidecar stores them, or (reason, detail) of the first problem.

    ``kind`` ``llava``: ``conversations``; ``dpo`` / ``mmpr``: a pair (prompt or question, chosen, rejected).
    The loader checks sidecars with it too, so a shard holds nothing the build would have refused.
    """
    if kind == "llava":
        return _validate_conversation(data, num_images)
    return _validate_pair(data, kind, num_images)


def _validate_conversation(data: dict, num_images: int) -> dict | tuple[str, str]:
    turns = data.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "malformed_row", "'conversations' must be a non-empty list"
    conversations = []
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            return "malformed_row", f"conversations[{i}] must be {{from, value}} strings, got {turn!r}"
        if turn["from"] not in ROLES:
            return "malformed_row", f"conversations[{i}]: unknown role {turn['from']!r}; known: {sorted(ROLES)}"
        if turn["from"] in ASSISTANT_ROLES and IMAGE_PLACEHOLDER in turn["value"]:
            return "image_in_response", f"conversations[{i}] (an assistant reply) holds {IMAGE_PLACEHOLDER}"
        conversations.append({"from": turn["from"], "value": turn["value"]})
    replies = [t["value"] for t in conversations if t["from"] in ASSISTANT_ROLES]
    if not replies or not any(r.strip() for r in replies):
        return "empty_text", "no non-empty assistant reply"
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations)
    if placeholders != num_images:
        return ("image_placeholder_mismatch",
                f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)")
    return {"type": "conversation", "conversations": conversations}


def _validate_pair(data: dict, kind: str, num_images: int) -> dict | tuple[str, str]:
    prompt_key = "question" if kind == "mmpr" else "prompt"
    for key in (prompt_key, "chosen", "rejected"):
        if not isinstance(data.get(key), str):
            return "malformed_row", f"{key!r} must be a string, got {data.get(key)!r}"
    prompt, chosen, rejected = data[prompt_key], data["chosen"], data["rejected"]
    if not prompt.strip() and num_images == 0:
        return "empty_text", f"{prompt_key!r} is empty"
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            return "empty_text", f"{key!r} is empty"
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if IMAGE_PLACEHOLDER in value:
            return "image_in_response", f"{key!r} holds {IMAGE_PLACEHOLDER}"
    if chosen.strip() == rejected.strip():
        return "identical_pair", "chosen and rejected are the same text"
    # PIVOT (and InternVL for MMPR) put a missing placeholder of a single image in front.
    if num_images == 1 and IMAGE_PLACEHOLDER not in prompt:
        prompt = image_first(prompt)
    placeholders = prompt.count(IMAGE_PLACEHOLDER)
    if placeholders != num_images:
        return ("image_placeholder_mismatch",
                f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)")
    return {"type": "pair", "prompt": prompt, "chosen": chosen, "rejected": rejected}
