"""Tiny training runs built in code: a tokenizer, real image files, shards, a run config YAML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pivot_mega.config import load_yaml
from pivot_mega.data.shard_builder import BuildOptions, build_shards
from pivot_mega.presets import model_preset_path
from tests.data.helpers import dpo_rows, image_token_id, llava_rows, make_tokenizer, write_images, write_json

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = model_preset_path("tiny")

# The toy task: the chosen answer names the colour that fills the image.
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}

STAGE_DATA = {"pretrain_projector": ("llava", "lm", "plain"), "pretrain_full": ("llava", "lm", "qwen2"),
              "sft": ("dpo", "lm", "qwen2"), "dpo": ("dpo", "dpo", "qwen2")}


def colour_rows(directory: Path, rng: np.random.Generator, count: int) -> list[dict]:
    """Preference pairs on images filled with one colour (plus noise): chosen names it, rejected another."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    rows = []
    for i in range(count):
        colour = names[i % len(names)]
        wrong = names[(i % len(names) + 1 + int(rng.integers(len(names) - 1))) % len(names)]
        pixels = np.clip(np.array(COLOURS[colour])[None, None] + rng.integers(-25, 26, (40, 40, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(directory / f"c{i}.png")
        rows.append({"id": f"colour-{i}", "image": f"c{i}.png", "prompt": "<image>\nwhat colour is this image?",
                     "chosen": f"it is {colour}", "rejected": f"it is {wrong}"})
    return rows


def write_tiny_run(directory: str | Path, stage: str = "dpo", overrides: list[str] | tuple = (), *,
                   samples: int = 24, colours: bool = False, seed: int = 0) -> Path:
    """Writes tokenizer, images, shards and ``run.yaml`` for a tiny model under ``directory``.

    ``overrides``: ``key=value`` strings written into the config (the same as ``--set``).
    Returns the config path; the run writes into ``directory/out``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kind, mode, template = STAGE_DATA[stage]
    tokenizer = directory / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        make_tokenizer(tokenizer)
    name = "colours" if colours else kind
    shards = directory / f"shards_{name}"
    if not (shards / "manifest.json").is_file():
        rng = np.random.default_rng(seed)
        if colours:
            rows = colour_rows(directory / "img_colours", rng, samples)
            image_root = directory / "img_colours"
        else:
            images = write_images(directory / "img", rng, samples)
            rows = llava_rows(rng, images, max_turns=2) if kind == "llava" else dpo_rows(rng, images)
            image_root = directory / "img"
        write_json(directory / f"{name}.json", rows)
        build_shards("dpo" if colours else kind, directory / f"{name}.json", shards, image_root,
                     BuildOptions(samples_per_shard=8, workers=1, progress=False))
    config = {
        "stage": stage,
        # The tokenizer's <|image_pad|> marks image positions, as Qwen2.5's does.
        "model": {**load_yaml(TINY_MODEL), "image_token_id": image_token_id(tokenizer)},
        "data": {"shards": str(shards), "tokenizer": str(tokenizer), "mode": mode, "template": template,
                 "max_seq_len": 320 if mode == "dpo" else 192, "micro_batch_rows": 1, "window_size": 64,
                 "backend": "python", "num_threads": 1, "prefetch": 1, "seed": seed},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.1},
        "train": {"out_dir": str(directory / "out"), "global_batch_size": 4, "max_steps": 4, "epochs": 20, "save_every": 0,
                  "log_every": 1, "progress": False, "tensorboard": False, "seed": seed},
    }
    from pivot_mega.config import apply_overrides
    apply_overrides(config, list(overrides))
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
