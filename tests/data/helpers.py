"""Test data built in code: a tiny byte-level BPE tokenizer, real JPEG/PNG files, source datasets."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pivot_mega.data.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, special_token_id, train_tokenizer

WORDS = ("the a cat dog sits on mat red blue green what is in this image picture describe it answer question "
         "yes no two three left right small large photo of person car tree sky house chart shows value "
         "number text reads sign window road water bird flies over near under behind").split()


def make_tokenizer(directory: Path, seed: int = 0) -> Path:
    """A byte-level BPE (Qwen's family) trained on random sentences, saved as an HF tokenizer dir."""
    rng = np.random.default_rng(seed)
    corpus = [" ".join(rng.choice(WORDS, size=12)) + rng.choice([".", "?", "!", "\n"]) for _ in range(400)]
    return train_tokenizer(directory, corpus, vocab_size=400, special_tokens=SPECIAL_TOKENS,
                           chat_template=CHAT_TEMPLATE)


def image_token_id(tokenizer_dir: Path) -> int:
    return special_token_id(tokenizer_dir, "<|image_pad|>")


def sentence(rng: np.random.Generator, low: int = 2, high: int = 12) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high + 1))))


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth colour blobs plus sensor noise."""
    base = rng.integers(0, 256, (height // 12 + 2, width // 12 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
    return np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, mode: str | None = None, **save_args) -> bytes:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def write_images(directory: Path, rng: np.random.Generator, count: int, prefix: str = "img") -> list[str]:
    """``count`` images of random sizes, alternating JPEG / PNG (one progressive JPEG, one grayscale)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        array = photo(rng, int(rng.integers(24, 90)), int(rng.integers(24, 90)))
        if i % 5 == 3:
            name, data = f"{prefix}{i}.jpg", encode(array, "JPEG", mode="L", quality=85)
        elif i % 2:
            name, data = f"{prefix}{i}.png", encode(array, "PNG")
        else:
            name, data = f"{prefix}{i}.jpg", encode(array, "JPEG", quality=int(rng.integers(70, 96)),
                                                    progressive=bool(i % 4 == 2))
        (directory / name).write_bytes(data)
        names.append(name)
    return names


def llava_rows(rng: np.random.Generator, images: list[str], max_turns: int = 3) -> list[dict]:
    rows = []
    for i, image in enumerate(images):
        turns = [{"from": "human", "value": "<image>\n" + sentence(rng) + "?"}]
        turns.append({"from": "gpt", "value": sentence(rng, 1, 20)})
        for _ in range(int(rng.integers(0, max_turns))):
            turns += [{"from": "human", "value": sentence(rng) + "?"}, {"from": "gpt", "value": sentence(rng, 1, 20)}]
        rows.append({"id": f"llava-{i}", "image": image, "conversations": turns})
    return rows


def dpo_rows(rng: np.random.Generator, images: list[str]) -> list[dict]:
    rows = []
    for i, image in enumerate(images):
        chosen = sentence(rng, 1, 20)
        rejected = sentence(rng, 1, 20)
        while rejected == chosen:
            rejected = sentence(rng, 1, 20)
        rows.append({"id": f"dpo-{i}", "image": image, "prompt": "<image>\n" + sentence(rng) + "?",
                     "chosen": chosen, "rejected": rejected})
    return rows


def write_json(path: Path, rows: list, jsonl: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, indent=1))
    return path
