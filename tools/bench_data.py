#!/usr/bin/env python3
"""Data benchmarks: image decoding throughput per CPU core, and packing efficiency.

    python tools/bench_data.py [--images 256] [--size 384] [--threads N] [--json out.json]

1. Images per CPU second at 384 px (decode + resize + SigLIP normalisation, one thread) for DALI on
   the CPU and for the python backend (PIL), on JPEGs of a LLaVA-like size mix. For reference also PIL
   with plain uint8 BILINEAR, as Hugging Face's SigLIP processor resizes (it does not match DALI's
   edge handling, so the python backend does not use it). With --threads N also N-thread throughput
   (images per wall-clock second, which other load on the machine lowers).
2. Padding fraction of packed rows over one epoch of synthetic lengths shaped like PIVOT's stages
   (576 image tokens + log-normal text), for several window sizes, against one sample per row.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image

from pivot_mega.data.images import DaliDecoder, PillowDecoder, dali_unavailable_reason
from pivot_mega.data.packing import plan_window

# (height, width, share): COCO-like photos, smaller web images, pretraining crops, large documents.
SIZE_MIX = [(480, 640, 0.4), (375, 500, 0.2), (336, 336, 0.1), (768, 1024, 0.2), (1080, 1920, 0.1)]


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    shapes = rng.choice(len(SIZE_MIX), size=count, p=[s for _, _, s in SIZE_MIX])
    out = []
    for k in shapes:
        height, width, _ = SIZE_MIX[k]
        base = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
        photo = np.asarray(Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
        photo = np.clip(photo + rng.integers(-12, 13, photo.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class _PilUint8:
    """PIL decode + uint8 BILINEAR resize + normalisation (the HF SigLIP processor's arithmetic)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, encoded: list[bytes]) -> np.ndarray:
        out = []
        for data in encoded:
            with Image.open(io.BytesIO(data)) as image:
                pixels = np.asarray(image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR))
            out.append((pixels / np.float32(127.5) - 1).transpose(2, 0, 1))
        return np.stack(out)


def images_per_second(decoder, encoded: list[bytes], batch: int = 64, repeats: int = 3) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process), best of ``repeats``.

    CPU seconds count every thread of the process, so the second number is the throughput of one
    core even when other work shares the machine.
    """
    decoder(encoded[:batch])  # warm-up (pipeline build, allocations)
    wall = cpu = 0.0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(encoded), batch):
            decoder(encoded[i:i + batch])
        wall = max(wall, len(encoded) / (time.perf_counter() - start))
        cpu = max(cpu, len(encoded) / (time.process_time() - start_cpu))
    return wall, cpu


def bench_images(count: int, size: int, threads: int) -> dict:
    encoded = make_jpegs(count)
    results = {"images": count, "size": size, "jpeg_mb": round(sum(map(len, encoded)) / 2**20, 1)}
    decoders = {"python": lambda n: PillowDecoder(size, n), "pil_uint8_hf_style": lambda n: _PilUint8(size)}
    reason = dali_unavailable_reason()
    if reason is None:
        decoders["dali_cpu"] = lambda n: DaliDecoder(size, n)
    else:
        results["dali_cpu"] = f"not run: {reason}"
    for name, make in decoders.items():
        results[f"{name}_per_core"] = round(images_per_second(make(1), encoded)[1], 1)
        if threads > 1 and name != "pil_uint8_hf_style":
            results[f"{name}_{threads}_threads_wall"] = round(images_per_second(make(threads), encoded)[0], 1)
    if reason is None:
        results["dali_over_python_per_core"] = round(results["dali_cpu_per_core"] / results["python_per_core"], 2)
    return results


def epoch_padding(lengths: list[int], capacity: int, window: int, world_size: int, rows_per_micro_batch: int) -> float:
    """Padding fraction of one epoch planned window by window, as the loader does (carry included)."""
    rng = np.random.default_rng(0)
    carry: list[int] = []
    tokens = rows = 0
    for start in range(0, len(lengths), window):
        units = carry + list(range(start, min(start + window, len(lengths))))
        final = start + window >= len(lengths)
        plan = plan_window([lengths[u] for u in units], capacity, rows_per_micro_batch, world_size, final, rng)
        for step in plan.steps:
            for micro_batch in step:
                rows += len(micro_batch)
                tokens += sum(lengths[units[i]] for row in micro_batch for i in row)
        carry = [units[i] for i in plan.carry]
    return 1 - tokens / (rows * capacity)


def stage_lengths(stage: str, count: int, rng: np.random.Generator) -> tuple[list[int], int]:
    """Synthetic per-unit token counts shaped like PIVOT's data, and the row length used for them."""
    image = 576
    if stage == "1a captions (LLaVA-558k, plain)":
        return list(image + rng.lognormal(3.3, 0.4, count).astype(int) + 2), 2048
    if stage == "1b / SFT conversations (ChatML)":
        text = rng.lognormal(5.3, 0.9, count).astype(int) + 30
        with_image = rng.random(count) < 0.93
        return [int(min(2048, t + image * w)) for t, w in zip(text, with_image)], 2048
    # DPO pairs: prompt (with image) twice + two responses, rows of 2 x 2048.
    prompt = image + 30 + rng.lognormal(4.0, 0.7, count).astype(int)
    responses = rng.lognormal(5.0, 0.8, (count, 2)).astype(int) + 2
    return [int(min(4096, 2 * p + r.sum())) for p, r in zip(prompt, responses)], 4096


def bench_packing(count: int, world_size: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for stage in ("1a captions (LLaVA-558k, plain)", "1b / SFT conversations (ChatML)", "DPO pairs (MMPR, 2 x 2048)"):
        lengths, capacity = stage_lengths(stage, count, rng)
        row = {"mean_tokens": round(float(np.mean(lengths)), 1), "row": capacity,
               "unpacked": round(1 - float(np.mean(lengths)) / capacity, 4)}
        for window in (256, 1024, 4096):
            row[f"window_{window}"] = round(epoch_padding(lengths, capacity, window, world_size, 1), 4)
        out[stage] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--threads", type=int, default=1, help="also measure N-thread throughput")
    parser.add_argument("--samples", type=int, default=20000, help="units per packing epoch")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    images = bench_images(args.images, args.size, args.threads)
    print(f"decode + resize to {args.size} + normalise, {args.images} JPEGs ({images['jpeg_mb']} MB), images/s:")
    for key, value in images.items():
        if key not in ("images", "size", "jpeg_mb"):
            print(f"  {key:32s} {value}")
    packing = bench_packing(args.samples, args.world_size)
    print(f"padding fraction, {args.samples} samples, {args.world_size} ranks x 1 row per micro-batch:")
    for stage, row in packing.items():
        cells = "  ".join(f"{k} {v}" for k, v in row.items())
        print(f"  {stage:34s} {cells}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": images, "packing": packing}, f, indent=1)


if __name__ == "__main__":
    main()
