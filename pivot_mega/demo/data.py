"""The demo's data: scikit-learn's handwritten digits in colour, written as users write theirs.

    images = render_digits(DigitSplits.make(seed=0), out / "images", image_size=64, seed=0)
    paths = write_datasets(images, out / "data")      # LLaVA JSON (1a, 1b), DPO JSON (SFT, DPO), probe folders

Real handwriting, none made here: the 1797 8x8 digits of ``sklearn.datasets.load_digits`` (written by
43 people, UCI's optdigits), upscaled smoothly and drawn in a random colour at a random place and
size on a dark background of a random tint. They ship with scikit-learn: nothing is downloaded. The digit numbers are split once into images the MLLM trains
on and images it never sees, which the probes and the held-out evaluation use.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Colours the digit is drawn in (RGB), named in the captions.
COLOURS = {"red": (235, 40, 40), "green": (40, 215, 60), "blue": (50, 90, 255), "yellow": (250, 230, 40),
           "white": (250, 250, 250), "cyan": (40, 230, 230), "magenta": (235, 50, 220), "orange": (255, 150, 30)}
DIGIT_QUESTIONS = ("Which digit is written in the image?", "What number is this?", "Read the handwritten digit.")

# Stage 1a (plain template: the prompt is dropped, the caption trained), as LLaVA-Pretrain's prompts.
CAPTION_PROMPTS = ("<image>\nDescribe the image briefly.", "<image>\nWhat is in this picture?",
                   "Give a short caption.\n<image>", "<image>\nSummarize the image.")
QUESTION = "<image>\nWhich digit is this?"


def answer(digit: int) -> str:
    """The reply to QUESTION that names ``digit``: the name alone, so that the loss of a reply is
    mostly the digit's (a longer reply's shared words are learned in a few steps and then only
    dilute it)."""
    return f"{DIGIT_NAMES[digit].capitalize()}."


@dataclasses.dataclass
class DigitSplits:
    """Indices into ``load_digits()``: ``train`` for the MLLM's stages, ``probe_train`` / ``probe_val``
    for the encoder probes (and ``probe_val`` for the held-out answers); disjoint."""

    train: np.ndarray
    probe_train: np.ndarray
    probe_val: np.ndarray

    @classmethod
    def make(cls, seed: int = 0, probe_per_class: int = 30, scale: float = 1.0) -> "DigitSplits":
        """``probe_per_class`` digits of each class for each probe split; the rest (or ``scale`` of
        it) for training."""
        from sklearn.datasets import load_digits

        labels = load_digits().target
        rng = np.random.default_rng(seed)
        probe_train, probe_val, rest = [], [], []
        for digit in range(10):
            members = rng.permutation(np.flatnonzero(labels == digit))
            probe_train += members[:probe_per_class].tolist()
            probe_val += members[probe_per_class:2 * probe_per_class].tolist()
            rest += members[2 * probe_per_class:].tolist()
        rest = rng.permutation(rest)[:max(10, int(round(len(rest) * scale)))]
        return cls(np.sort(rest), np.sort(probe_train), np.sort(probe_val))


@dataclasses.dataclass
class DigitImage:
    """One rendered picture: ``file`` relative to the image root, and what it shows."""

    file: str
    index: int  # into load_digits()
    digit: int
    colour: str

    def caption(self) -> str:
        return f"a handwritten {DIGIT_NAMES[self.digit]} in {self.colour}"


# The digit's side as a fraction of the image's, drawn uniformly; the background's channels, each
# drawn uniformly in 0..BACKGROUND_MAX (a dark tint). Large, on a plain background: a ViT trained from
# scratch for minutes on a CPU learns these (measured: a direct classifier of the demo's ViT reaches
# 88 % after 400 steps of 16 at 32 px in 8 px patches), while over crops of photos it stayed near
# chance for as long.
DIGIT_SIZE = (0.8, 0.95)
BACKGROUND_MAX = 60


def render_digit(digit_pixels: np.ndarray, rng: np.random.Generator, image_size: int,
                 colour: tuple[int, int, int]) -> np.ndarray:
    """An 8x8 digit (values 0-16) upscaled smoothly and drawn at a random size and place on a dark
    background of a random tint: ``[image_size, image_size, 3]`` uint8."""
    from PIL import Image

    tint = rng.uniform(0, BACKGROUND_MAX, 3).astype(np.float32)
    canvas = np.broadcast_to(tint, (image_size, image_size, 3)).copy()
    size = int(rng.integers(round(image_size * DIGIT_SIZE[0]), round(image_size * DIGIT_SIZE[1]) + 1))
    mask = Image.fromarray((digit_pixels / 16.0 * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    y, x = int(rng.integers(0, image_size - size + 1)), int(rng.integers(0, image_size - size + 1))
    region = canvas[y:y + size, x:x + size]
    canvas[y:y + size, x:x + size] = (1 - alpha) * region + alpha * np.asarray(colour, dtype=np.float32)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def render_digits(indices: np.ndarray, directory: str | os.PathLike, *, image_size: int, seed: int,
                  prefix: str, image_format: str = "png", subdirs_by_digit: bool = False) -> list[DigitImage]:
    """Renders the digits ``indices`` of ``load_digits()`` (one picture each, drawn with ``seed``)
    into ``directory`` as ``{prefix}{index:04d}.png|jpg`` (under ``{digit}_{name}/`` with
    ``subdirs_by_digit``: the ImageFolder layout of the probes)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    colour_names = list(COLOURS)
    out = []
    for index in indices.tolist():
        digit = int(digits.target[index])
        colour = colour_names[int(rng.integers(len(colour_names)))]
        pixels = render_digit(digits.images[index], rng, image_size, COLOURS[colour])
        folder = f"{digit}_{DIGIT_NAMES[digit]}/" if subdirs_by_digit else ""
        file = f"{folder}{prefix}{index:04d}.{image_format}"
        (directory / file).parent.mkdir(parents=True, exist_ok=True)
        if image_format == "jpg":
            Image.fromarray(pixels).save(directory / file, quality=92)
        else:
            Image.fromarray(pixels).save(directory / file)
        out.append(DigitImage(file, index, digit, colour))
    return out


# ----------------------------------------------------------------------------------------------
# datasets in the users' formats


def caption_rows(images: list[DigitImage], rng: np.random.Generator) -> list[dict]:
    """Stage 1a, LLaVA-Pretrain style: one prompt (dropped by the plain template), the caption."""
    return [{"id": f"caption-{Path(im.file).stem}", "image": im.file,
             "conversations": [{"from": "human", "value": CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]},
                               {"from": "gpt", "value": im.caption()}]}
            for im in images]


def conversation_rows(images: list[DigitImage], rng: np.random.Generator) -> list[dict]:
    """Stage 1b, LLaVA-NeXT style: the digit, then (every other conversation or so) its colour."""
    rows = []
    for im in images:
        question = DIGIT_QUESTIONS[int(rng.integers(len(DIGIT_QUESTIONS)))]
        turns = [("<image>\n" + question, answer(im.digit))]
        if rng.random() < 0.5:
            turns.append(("What colour is the digit?", f"The digit is {im.colour}."))
        rows.append({"id": f"chat-{Path(im.file).stem}", "image": im.file,
                     "conversations": [{"from": role, "value": text} for q, a in turns
                                       for role, text in (("human", q), ("gpt", a))]})
    return rows


def preference_rows(images: list[DigitImage], rng: np.random.Generator) -> list[dict]:
    """SFT and DPO, PIVOT's DPO JSON: the right digit chosen, a wrong one (drawn at random) rejected."""
    rows = []
    for im in images:
        wrong = (im.digit + 1 + int(rng.integers(9))) % 10
        rows.append({"id": f"pair-{Path(im.file).stem}", "image": im.file, "prompt": QUESTION,
                     "chosen": answer(im.digit), "rejected": answer(wrong)})
    return rows


def corpus(rows_by_name: dict[str, list[dict]], system_prompt: str) -> list[str]:
    """Every text the templates will tokenize (pieces as the qwen2 and plain templates cut them)."""
    texts = [f"<|im_start|>system\n{system_prompt}<|im_end|>\n", "<|im_start|>user\n", "<|im_start|>assistant\n",
             "<|im_end|>\n"]
    for rows in rows_by_name.values():
        for row in rows:
            if "conversations" in row:
                for turn in row["conversations"]:
                    texts.append(turn["value"].replace("<image>", "").strip("\n") + "\n")
            else:
                texts += [row["prompt"].replace("<image>", "").strip("\n"), row["chosen"], row["rejected"]]
    return texts


def write_json(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return path
