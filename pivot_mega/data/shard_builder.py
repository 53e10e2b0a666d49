"""Builds WebDataset shards (the format: ``shards``) from LLaVA, DPO, MMPR and mixture sources.

Images are verified at build time by decoding them fully. JPEG, PNG and WebP files in RGB or
grayscale are stored as they are; other formats and modes (CMYK, palette, alpha, 16-bit, GIF, ...)
are converted once to 8-bit RGB PNG, recorded in the manifest, because decoders disagree on them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
import random
import tarfile
from collections import Counter
from pathlib import Path

from .shards import FORMAT_NAME, FORMAT_VERSION, INDEX_VERSION, MANIFEST
from .sources import (DataError, Row, Sample, Skip, rows_from_file, rows_from_mixture, rows_from_mmpr,
                      validate)

KIND_CHOICES = ("llava", "dpo", "mmpr", "mixture")
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
STORED_MODES = {"RGB", "L"}
# Fixed member mtime: the same inputs give byte-identical shards.
TAR_MTIME = 0


@dataclasses.dataclass
class BuildOptions:
    """How ``build_shards`` splits, samples and checks. A shard closes at whichever limit comes first."""

    samples_per_shard: int | None = None
    shard_size_mb: float | None = 512.0
    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    strict: bool = False
    # Keep N samples: candidates in the order of random.Random(seed).shuffle, the first N that pass
    # every check (PIVOT's MMPR selection: --max-samples 20000 --seed 777).
    max_samples: int | None = None
    seed: int = 0
    # Pairs whose f"{prompt} {chosen}" exceeds this many tokens are skipped (PIVOT: 1500).
    max_prompt_chosen_tokens: int | None = None
    tokenizer: str | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.samples_per_shard is None and self.shard_size_mb is None:
            raise DataError("give --samples-per-shard or --shard-size-mb")
        if self.samples_per_shard is not None and self.samples_per_shard <= 0:
            raise DataError(f"--samples-per-shard must be > 0, got {self.samples_per_shard}")
        if self.shard_size_mb is not None and self.shard_size_mb <= 0:
            raise DataError(f"--shard-size-mb must be > 0, got {self.shard_size_mb}")
        if self.workers <= 0:
            raise DataError(f"--workers must be > 0, got {self.workers}")
        if self.max_samples is not None and self.max_samples <= 0:
            raise DataError(f"--max-samples must be > 0, got {self.max_samples}")
        if (self.max_prompt_chosen_tokens is None) != (self.tokenizer is None):
            raise DataError("--max-prompt-chosen-tokens and --tokenizer go together")


# ----------------------------------------------------------------------------------------------
# Images (run in worker processes)


class _ImageProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def load_image(path: str) -> tuple[str, bytes, str | None]:
    """(extension, bytes to store, what it was converted from or None) for one image file."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise _ImageProblem("missing_image", f"{path} does not exist") from None
    except OSError as e:
        raise _ImageProblem("missing_image", f"{path}: {e}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format, mode = image.format, image.mode
            image.load()  # a full decode: truncated and corrupt files fail here, not in training
            if image_format in STORED_FORMATS and mode in STORED_MODES:
                return STORED_FORMATS[image_format], data, None
            # Alpha is dropped, as LLaVA's Image.open(...).convert("RGB") does.
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            return "png", buffer.getvalue(), f"{image_format} {mode}"
    except Image.DecompressionBombError as e:
        raise _ImageProblem("image_too_large", f"{path}: {e}") from None
    except UnidentifiedImageError:
        raise _ImageProblem("corrupt_image", f"{path}: not an image PIL can read") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise _ImageProblem("corrupt_image", f"{path}: {type(e).__name__}: {e}") from None


def _load_images(paths: list[str]) -> list[tuple[str, bytes, str | None]] | tuple[str, str]:
    try:
        return [load_image(p) for p in paths]
    except _ImageProblem as e:
        return e.reason, e.detail


# ----------------------------------------------------------------------------------------------
# Writing


class _ShardWriter:
    """Writes samples into NNNNNN.tar files, each followed by its DALI index, rolling at the limits."""

    def __init__(self, out: Path, samples_per_shard: int | None, shard_size_mb: float | None):
        self.out = out
        self.max_samples = samples_per_shard
        self.max_bytes = None if shard_size_mb is None else int(shard_size_mb * 2**20)
        self.shards: list[dict] = []
        self._tar = None
        self._count = self._bytes = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(len(v) for v in members.values())
        full = ((self.max_samples is not None and self._count >= self.max_samples)
                or (self.max_bytes is not None and self._count and self._bytes + size > self.max_bytes))
        if self._tar is None or full:
            self._open_next()
        self._tar.write({"__key__": key, **members})
        self._count += 1
        self._bytes += size

    def _open_next(self) -> None:
        import webdataset

        self._close_current()
        name = f"{len(self.shards):06d}"
        self.shards.append({"tar": f"{name}.tar", "index": f"{name}.idx", "samples": 0})
        self._tar = webdataset.TarWriter(str(self.out / f"{name}.tar"), encoder=False, mtime=TAR_MTIME)
        self._count = self._bytes = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        shard = self.shards[-1]
        shard["samples"] = write_index(self.out / shard["tar"], self.out / shard["index"])
        shard["bytes"] = (self.out / shard["tar"]).stat().st_size

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards


def write_index(tar_path: Path, index_path: Path) -> int:
    """Writes the DALI webdataset index of a tar (the format of DALI's wds2idx); returns #samples."""
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append(f"{ext} {member.offset_data} {member.size} {member.name}")
    index_path.write_text(f"{INDEX_VERSION} {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples))
    return len(samples)


def _read_rows(kind: str, input_path: Path, image_root: Path | None,
               seed: int) -> tuple[list[Row], list[Skip], list[dict]]:
    if kind in ("llava", "dpo"):
        rows, skips = rows_from_file(input_path, kind, image_root or input_path.parent)
        return rows, skips, []
    if kind == "mmpr":
        rows, skips = rows_from_mmpr(input_path, image_root)
        return rows, skips, []
    if kind == "mixture":
        return rows_from_mixture(input_path, image_root or input_path.parent, seed)
    raise DataError(f"--kind {kind!r} is not one of {list(KIND_CHOICES)}")


def _check_text(rows: list[Row], tokenizer, budget: int | None) -> list[Sample | Skip]:
    """Validates rows; with a tokenizer, also PIVOT's MMPR length rule: the tokens of
    f"{prompt} {chosen}" (prompt with its <image> text, no special tokens) must be <= budget."""
    checked = [validate(row) for row in rows]
    pairs = [i for i, c in enumerate(checked) if isinstance(c, Sample) and c.is_pair]
    if tokenizer is None or not pairs:
        return checked
    texts = [f"{checked[i].text['prompt']} {checked[i].text['chosen']}".strip() for i in pairs]
    for i, ids in zip(pairs, tokenizer(texts, add_special_tokens=False)["input_ids"]):
        if len(ids) > budget:
            c = checked[i]
            checked[i] = Skip(c.source, c.line, c.sample_id, "over_token_budget",
                              f"prompt + chosen is {len(ids)} tokens, over the budget of {budget}")
    return checked


@dataclasses.dataclass
class _Tally:
    """What a build wrote and left out, for the manifest."""

    skips: list[Skip]
    kinds: Counter = dataclasses.field(default_factory=Counter)  # conversation / pair
    written_by_source: Counter = dataclasses.field(default_factory=Counter)
    converted: list[dict] = dataclasses.field(default_factory=list)
    images: int = 0
    evaluated: int = 0

    @property
    def written(self) -> int:
        return sum(self.kinds.values())


def build_shards(kind: str, input_path: str | os.PathLike, out: str | os.PathLike,
                 image_root: str | os.PathLike | None = None, options: BuildOptions | None = None) -> dict:
    """Builds a shard directory from an input dataset; returns the manifest (also written to disk).

    Bad samples are skipped and listed with their reason; with ``options.strict`` the first one
    raises DataError instead. Output is the same for any number of workers.
    """
    options = options or BuildOptions()
    options.validate()
    input_path, out = Path(input_path), Path(out)
    image_root = Path(image_root) if image_root is not None else None
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: output directory is not empty")
    out.mkdir(parents=True, exist_ok=True)

    rows, skips, mixture_report = _read_rows(kind, input_path, image_root, options.seed)
    if options.strict and skips:
        raise DataError(skips[0].message())
    candidates = list(rows)
    if options.max_samples is not None:
        random.Random(options.seed).shuffle(candidates)
    tokenizer = None
    if options.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(options.tokenizer)

    from tqdm import tqdm

    tally = _Tally(skips)
    target = options.max_samples if options.max_samples is not None else len(candidates)
    writer = _ShardWriter(out, options.samples_per_shard, options.shard_size_mb)
    # fork where there is one: spawned workers would re-import the caller (torch, for the CLI).
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = context.Pool(options.workers) if options.workers > 1 else None
    progress = tqdm(total=target, unit="sample", desc=f"shards {out.name}", disable=not options.progress or None)
    chunk = 64 * options.workers
    try:
        for start in range(0, len(candidates), chunk):
            checked = _check_text(candidates[start:start + chunk], tokenizer, options.max_prompt_chosen_tokens)
            jobs = [c.image_paths for c in checked if isinstance(c, Sample)]
            loaded = iter(pool.map(_load_images, jobs) if pool is not None else map(_load_images, jobs))
            for item in checked:
                if tally.written >= target:
                    break
                tally.evaluated += 1
                if isinstance(item, Sample):
                    images = next(loaded)
                    if isinstance(images, tuple):  # (reason, detail)
                        item = Skip(item.source, item.line, item.sample_id, *images)
                if isinstance(item, Skip):
                    if options.strict:
                        raise DataError(item.message())
                    tally.skips.append(item)
                    progress.update(0 if options.max_samples is not None else 1)
                    continue
                _write_sample(writer, item, images, tally)
                progress.update(1)
            if tally.written >= target:
                break
    except BaseException:
        writer.close()
        for shard in writer.shards:  # no half-built shard set is left behind
            for name in (shard["tar"], shard["index"]):
                (out / name).unlink(missing_ok=True)
        raise
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
    shards = writer.close()

    manifest = _manifest(kind, input_path, image_root, options, rows, shards, tally, len(candidates), mixture_report)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def _write_sample(writer: _ShardWriter, sample: Sample, images: list[tuple[str, bytes, str | None]],
                  tally: _Tally) -> None:
    members = [ext if len(images) == 1 else f"{i}.{ext}" for i, (ext, _, _) in enumerate(images)]
    payload = {member: data for member, (_, data, _) in zip(members, images)}
    sidecar = {"id": sample.sample_id, "source": sample.source, "line": sample.line, **sample.text, "images": members}
    payload["json"] = json.dumps(sidecar, ensure_ascii=False).encode("utf-8")
    writer.add(f"{tally.written:09d}", payload)
    tally.converted += [{"sample_id": sample.sample_id, "source": sample.source, "line": sample.line,
                         "member": member, "from": was} for member, (_, _, was) in zip(members, images) if was]
    tally.kinds[sample.text["type"]] += 1
    tally.images += len(images)
    tally.written_by_source[sample.source] += 1


# Skips made while reading the input, before a row exists (they count as rows read).
_READ_REASONS = ("malformed_json", "multi_image")


def _manifest(kind: str, input_path: Path, image_root: Path | None, options: BuildOptions, rows: list[Row],
              shards: list[dict], tally: _Tally, num_candidates: int, mixture_report: list[dict]) -> dict:
    rows_by_source = Counter(r.source for r in rows) + Counter(s.source for s in tally.skips
                                                                if s.reason in _READ_REASONS)
    skipped_by_source: dict[str, Counter] = {}
    for s in tally.skips:
        skipped_by_source.setdefault(s.source, Counter())[s.reason] += 1
    sources = []
    for source in sorted(set(rows_by_source) | set(skipped_by_source)):
        by_reason = dict(sorted(skipped_by_source.get(source, Counter()).items()))
        sources.append({"source": source, "rows": rows_by_source[source], "written": tally.written_by_source[source],
                        "skipped": sum(by_reason.values()), "skipped_by_reason": by_reason})
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "input": str(input_path),
        "image_root": None if image_root is None else str(image_root),
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k not in ("workers", "progress")},
        "counts": {
            "rows": sum(rows_by_source.values()),
            "written": tally.written,
            "conversations": tally.kinds["conversation"],
            "pairs": tally.kinds["pair"],
            "images": tally.images,
            "converted_images": len(tally.converted),
            "skipped": len(tally.skips),
            "skipped_by_reason": dict(sorted(Counter(s.reason for s in tally.skips).items())),
            # Candidates never looked at because --max-samples were already kept.
            "not_sampled": num_candidates - tally.evaluated,
        },
        "sources": sources,
        "mixture": mixture_report,
        "shards": shards,
        "skipped": [s.as_dict() for s in tally.skips],
        "converted": tally.converted,
    }


def summarize(manifest: dict, out: str | os.PathLike) -> str:
    """A few lines for the terminal: counts, skips by reason, where the manifest is."""
    counts = manifest["counts"]
    lines = [f"wrote {counts['written']} samples ({counts['conversations']} conversations, {counts['pairs']} pairs, "
             f"{counts['images']} images) into {len(manifest['shards'])} shard(s) in {out}",
             f"read {counts['rows']} rows; skipped {counts['skipped']}"
             + (f"; not sampled {counts['not_sampled']}" if counts["not_sampled"] else "")
             + (f"; converted {counts['converted_images']} image(s) to PNG" if counts["converted_images"] else "")]
    for reason, n in counts["skipped_by_reason"].items():
        lines.append(f"  skipped {n:>8}  {reason}")
    for entry in manifest["mixture"]:
        lines.append(f"  {entry['json_path']}: {entry['sampling_strategy']} -> {entry['selected']} of {entry['rows']}")
    lines.append(f"manifest (every skipped sample with its reason): {Path(out) / MANIFEST}")
    return "\n".join(lines)
