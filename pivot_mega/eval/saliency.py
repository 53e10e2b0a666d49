"""Gradient saliency of the image tokens: where in the image the loss wants the features to change.

PIVOT's "Grad-CAM" (``llava/train/hook.py`` of its code), which is gradient-magnitude saliency:

1. the gradient of the loss with respect to the projector's output, ``[T, H]`` per image;
2. its L1 norm over the channels, one value per image token, on the ``g × g`` patch grid;
3. each border row and column replaced by a random one of the two rows (columns) inside it, since
   ViTs park register-like high-norm tokens at the border (Darcet et al. 2023); rows first, then
   columns from the rows' result, so the corners also take inner values;
4. min-max normalised to [0, 1], then raised to the power 1.1;
5. upsampled bilinearly to the image size and drawn with the jet colormap at alpha 0.6 over the
   image darkened to 70 %.

Losses: ``sft``: each sample's mean NLL over its response tokens. ``dpo``: each pair's DPO loss
(``training.losses.dpo_loss``), whose reference log-probs are constants, from a reference model or by
default from the model itself (then ``h = 0``, and the gradient is ``-beta/2`` times that of
``log p(chosen) - log p(rejected)``). A pair shows its image to both sequences: the gradient at the
chosen sequence's copy gives the chosen map, at the rejected's the rejected map, drawn side by side.
Several samples in a packed row do not mix: attention stays inside a sample, so the gradient at an
image is that of its own sample's (or pair's) loss.

    model = VisionLanguageModel.from_checkpoint("ckpt/dpo")
    for batch in loader:                                   # data.PackedDataLoader
        maps = image_saliency(model, batch, loss="dpo")    # one ImageSaliency per image
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

GAMMA = 1.1
OVERLAY_ALPHA = 0.6
BACKGROUND_BRIGHTNESS = 0.7
PANEL_GAP = 4  # white pixels between the chosen and rejected panels
LossName = Literal["sft", "dpo"]

# matplotlib's "jet": (x, value) breakpoints of each channel, linear in between.
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


class SaliencyError(ValueError):
    """The batch or model cannot give a map; the message names the sample or tensor."""


@dataclasses.dataclass
class ImageSaliency:
    """One image's map. ``raw [g, g]``: L1 norm over channels of d(loss)/d(projector output) per
    image token; ``pixel_values [3, S, S]``: the image as the model saw it (SigLIP-normalised);
    ``role``: ``response`` (sft), ``chosen`` or ``rejected`` (dpo); ``loss``: its sample's or pair's
    loss; ``pair``: the pair's number in the batch (dpo); ``image_index``: the image's number within
    its sequence."""

    raw: torch.Tensor
    pixel_values: torch.Tensor
    sample_id: str
    role: str
    loss: float
    segment: int
    pair: int | None = None
    image_index: int = 0


# ----------------------------------------------------------------------------------------------
# gradients


def segment_logprobs(hidden: torch.Tensor, head_weight: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each segment's targets: hidden ``[R, S, H]`` → ``(sums [K], counts [K])`` for
    the K segments of the batch's layout (padding segments: 0)."""
    from ..parallel.loss import token_logprobs
    from ..training.losses import sequence_logprob_sums

    targets = batch.targets.to(hidden.device)
    token_lp = token_logprobs(hidden, head_weight, targets)
    sums, counts = sequence_logprob_sums(token_lp, targets.sequence, targets.num_sequences)
    segments = batch.sequence_segments().to(hidden.device)
    num_segments = batch.packed.num_segments
    return (sums.new_zeros(num_segments).index_add(0, segments, sums),
            counts.new_zeros(num_segments).index_add(0, segments, counts))


def _forward_hidden(model, batch, device) -> torch.Tensor:
    # pixel_values has one entry per image-token run (not batch.images + image_index, which encodes a
    # pair's image once): each copy gets its own projector output, so chosen and rejected get their own map.
    return model(batch.input_ids.to(device), batch.pixel_values.to(device), packed=batch.packed.to(device),
                 return_hidden=True)


def image_token_gradients(model, batch, *, loss: LossName = "sft", reference=None, dpo_config=None):
    """d(loss)/d(projector output) for every image of a ``batch.MicroBatch``.

    → ``(grads [N_img, T, H_llm] fp32, losses [K] per segment (NaN where no loss), image_segments
    [N_img])``; for ``dpo`` both segments of a pair hold the pair's loss. The summed loss of all
    samples (pairs) is differentiated; an image only reaches its own sample's loss. ``reference``:
    the DPO reference model (default: ``model`` itself, its log-probs taken as constants).
    Parameter gradients are not computed.
    """
    from ..training.losses import DPOConfig, dpo_loss

    if loss not in ("sft", "dpo"):
        raise SaliencyError(f"loss {loss!r}: choose sft or dpo")
    if batch.images is None:
        raise SaliencyError("the batch has no images")
    device = next(model.parameters()).device
    captured = {}

    def as_leaf(module, inputs, output):  # the projector output becomes the tensor we differentiate by
        captured["features"] = output.detach().requires_grad_(True)
        return captured["features"]

    handle = model.projector.register_forward_hook(as_leaf)
    try:
        with torch.enable_grad():
            hidden = _forward_hidden(model, batch, device)
    finally:
        handle.remove()
    features = captured["features"]
    with torch.enable_grad():
        sums, counts = segment_logprobs(hidden, model.language.head_weight, batch)
        losses = torch.full(sums.shape, float("nan"), dtype=torch.float32, device=device)
        if loss == "sft":
            has_labels = counts > 0
            per_segment = -sums[has_labels] / counts[has_labels]
            losses[has_labels] = per_segment.detach().float()
            total = per_segment.sum()
        else:
            pairs = batch.pair_segments.to(device)
            if pairs.numel() == 0:
                raise SaliencyError(f"loss 'dpo' needs preference pairs, the batch of samples "
                                    f"{sorted(set(i for i in batch.sample_ids if i))[:5]} has none")
            if reference is None:
                ref_sums = sums.detach()
            else:
                with torch.no_grad():
                    ref_device = next(reference.parameters()).device
                    ref_hidden = _forward_hidden(reference, batch, ref_device)
                    ref_sums, _ = segment_logprobs(ref_hidden, reference.language.head_weight, batch)
                    ref_sums = ref_sums.to(device)
            chosen, rejected = pairs[:, 0], pairs[:, 1]
            empty = (counts[chosen] == 0) | (counts[rejected] == 0)
            if empty.any():
                p = int(empty.nonzero()[0])
                raise SaliencyError(f"pair {batch.sample_ids[int(chosen[p])]!r} has a response without labels")
            pair_losses, _ = dpo_loss(sums[chosen], sums[rejected], ref_sums[chosen], ref_sums[rejected],
                                      counts[chosen], counts[rejected], (dpo_config or DPOConfig()).validate())
            losses[chosen] = pair_losses.detach().float()
            losses[rejected] = pair_losses.detach().float()
            total = pair_losses.sum()
        grads = torch.autograd.grad(total, features, allow_unused=True)[0] if total.requires_grad else None
    if grads is None:  # no labelled token in the batch (or no path from the images to the loss)
        grads = torch.zeros_like(features)
    return grads.float(), losses, _image_segments(batch, model.config, features.shape[1]).to(device)


def _image_segments(batch, config, tokens_per_image: int) -> torch.Tensor:
    """``[N_img]`` segment of each image: images fill the image-token runs in reading order."""
    flat = batch.input_ids.reshape(-1)
    positions = (flat == config.image_token_id).nonzero().squeeze(1)
    if positions.numel() != batch.pixel_values.shape[0] * tokens_per_image:
        raise SaliencyError(f"input_ids hold {positions.numel()} image tokens for {batch.pixel_values.shape[0]} "
                            f"images of {tokens_per_image} tokens")
    starts = (positions[::tokens_per_image] if positions.numel() else positions).contiguous()
    return batch.packed.segment_ids.reshape(-1)[starts]


def image_saliency(model, batch, *, loss: LossName = "sft", reference=None, dpo_config=None) -> list[ImageSaliency]:
    """One :class:`ImageSaliency` per image run of ``batch`` (a ``batch.MicroBatch``), in pixel_values order."""
    grads, losses, image_segments = image_token_gradients(model, batch, loss=loss, reference=reference,
                                                          dpo_config=dpo_config)
    tokens = grads.shape[1]
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise SaliencyError(f"{tokens} image tokens do not form a square patch grid")
    raw = grads.abs().sum(dim=-1).reshape(-1, side, side).cpu()
    pair_of = {}
    for p, (c, r) in enumerate(batch.pair_segments.tolist()):
        pair_of[c], pair_of[r] = (p, "chosen"), (p, "rejected")
    out, seen = [], {}
    for i, segment in enumerate(image_segments.tolist()):
        pair, role = pair_of.get(segment, (None, "response")) if loss == "dpo" else (None, "response")
        out.append(ImageSaliency(raw=raw[i], pixel_values=batch.pixel_values[i].detach().float().cpu(),
                                 sample_id=batch.sample_ids[segment], role=role, loss=float(losses[segment]),
                                 segment=segment, pair=pair, image_index=seen.get(segment, 0)))
        seen[segment] = seen.get(segment, 0) + 1
    return out


# ----------------------------------------------------------------------------------------------
# maps → pictures


def replace_border(heat: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[g, g]`` → a copy whose border rows, then columns, are copies of one of the two rows
    (columns) inside them, picked at random per cell. Grids under 4 × 4 are returned as they are."""
    height, width = heat.shape
    if height < 4 or width < 4:
        return heat.clone()
    out = heat.clone()
    cols, rows = torch.arange(width), torch.arange(height)
    pick = lambda n: torch.randint(0, 2, (n,), generator=generator)  # noqa: E731
    out[0, cols] = heat[1 + pick(width), cols]
    out[height - 1, cols] = heat[height - 2 - pick(width), cols]
    inner = out.clone()
    out[rows, 0] = inner[rows, 1 + pick(height)]
    out[rows, width - 1] = inner[rows, width - 2 - pick(height)]
    return out


def normalise_map(raw: torch.Tensor, *, gamma: float = GAMMA, border: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``[g, g]`` raw gradient norms → ``[g, g]`` in [0, 1]: border replaced, min-max, power ``gamma``.
    A constant map stays constant (0)."""
    heat = replace_border(raw.float(), generator) if border else raw.float().clone()
    low, high = float(heat.min()), float(heat.max())
    heat = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    return heat.clamp(0.0, 1.0).pow(gamma)


def upsample(heat: torch.Tensor, size: int) -> torch.Tensor:
    """``[g, g]`` → ``[size, size]``, bilinear (pixel centres aligned, as PIL and OpenCV resize)."""
    return F.interpolate(heat[None, None].float(), size=(size, size), mode="bilinear",
                         align_corners=False)[0, 0].clamp(0.0, 1.0)


def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape ``[...]`` → RGB ``[..., 3]`` in [0, 1] (matplotlib's jet)."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return np.stack([np.interp(values, *zip(*_JET[c])) for c in ("red", "green", "blue")], axis=-1)


def to_rgb(pixel_values: torch.Tensor) -> np.ndarray:
    """SigLIP-normalised ``[3, S, S]`` (mean 0.5, std 0.5) → ``[S, S, 3]`` uint8."""
    rgb = (pixel_values.float().clamp(-1, 1) + 1.0) * 127.5
    return rgb.round().to(torch.uint8).permute(1, 2, 0).numpy()


def overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = OVERLAY_ALPHA,
            brightness: float = BACKGROUND_BRIGHTNESS) -> np.ndarray:
    """``image [S, S, 3]`` uint8, ``heat [S, S]`` in [0, 1] → jet(heat) at ``alpha`` over the image
    darkened to ``brightness``: ``[S, S, 3]`` uint8."""
    background = image.astype(np.float64) * brightness
    blended = (1.0 - alpha) * background + alpha * 255.0 * jet(heat)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def render(item: ImageSaliency, generator: torch.Generator | None = None) -> np.ndarray:
    """One map drawn over its image: ``[S, S, 3]`` uint8."""
    size = item.pixel_values.shape[-1]
    heat = upsample(normalise_map(item.raw, generator=generator), size)
    return overlay(to_rgb(item.pixel_values), heat.numpy())


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = PANEL_GAP) -> np.ndarray:
    """Two ``[S, S, 3]`` panels → ``[S, 2S + gap, 3]`` with a white gap."""
    spacer = np.full((left.shape[0], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([left, spacer, right], axis=1)


# ----------------------------------------------------------------------------------------------
# a run over a data loader


def _file_stem(number: int, sample_id: str, image_index: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id)[:80] or "sample"
    return f"{number:04d}_{safe}" + (f"_img{image_index}" if image_index else "")


def write_saliency(items: Iterable[ImageSaliency], out_dir: str | os.PathLike, *, start: int = 0,
                   seed: int = 0, limit: int | None = None) -> list[dict]:
    """Writes one PNG per image (``response``) or per pair image (chosen | rejected side by side),
    and the raw maps as ``.npy``; → index entries ``{file, sample_id, roles, loss, raw_max}``.

    ``seed`` drives the random border replacement, so the same maps give the same pictures.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    groups: dict[tuple, dict[str, ImageSaliency]] = {}
    for item in items:
        key = (item.pair, item.image_index) if item.pair is not None else (("segment", item.segment), item.image_index)
        groups.setdefault(key, {})[item.role] = item
    entries = []
    for number, panels in enumerate(groups.values(), start=start):
        if limit is not None and len(entries) >= limit:
            break
        roles = [r for r in ("response", "chosen", "rejected") if r in panels]
        if len(roles) == 2 and roles != ["chosen", "rejected"]:
            raise SaliencyError(f"sample {panels[roles[0]].sample_id!r}: unexpected panels {roles}")
        first = panels[roles[0]]
        stem = _file_stem(number, first.sample_id, first.image_index)
        pictures = [render(panels[r], generator) for r in roles]
        picture = side_by_side(*pictures) if len(pictures) == 2 else pictures[0]
        Image.fromarray(picture).save(out_dir / f"{stem}.png")
        np.save(out_dir / f"{stem}.npy", np.stack([panels[r].raw.numpy() for r in roles]))
        entries.append({"file": f"{stem}.png", "raw": f"{stem}.npy", "sample_id": first.sample_id, "roles": roles,
                        "loss": first.loss, "raw_max": [float(panels[r].raw.max()) for r in roles]})
    return entries


def run_saliency(model, loader, out_dir: str | os.PathLike, *, loss: LossName = "sft", reference=None,
                 dpo_config=None, max_images: int = 16, seed: int = 0, progress: bool = True) -> list[dict]:
    """Maps for the first ``max_images`` pictures (images for ``sft``, pairs for ``dpo``) of
    ``loader``'s first epoch → ``out_dir/*.png``, ``*.npy`` and ``index.json``; → the index."""
    from tqdm import tqdm

    entries: list[dict] = []
    bar = tqdm(total=max_images, desc="saliency", unit="image", disable=not progress)
    try:
        for batch in loader:
            if batch.epoch > 0 or len(entries) >= max_images:
                break
            if batch.pixel_values is None or batch.pixel_values.shape[0] == 0:
                continue
            items = image_saliency(model, batch, loss=loss, reference=reference, dpo_config=dpo_config)
            written = write_saliency(items, out_dir, start=len(entries), seed=seed + len(entries),
                                     limit=max_images - len(entries))
            entries += written
            bar.update(len(written))
    finally:
        bar.close()
    if not entries:
        raise SaliencyError("no sample with an image in the data: nothing to draw")
    meta = {"loss": loss, "reference": "model itself" if reference is None else "separate model",
            "gamma": GAMMA, "alpha": OVERLAY_ALPHA, "brightness": BACKGROUND_BRIGHTNESS, "maps": entries}
    (Path(out_dir) / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
    return entries


def build_loader(model_config, shards: str | os.PathLike, tokenizer: str | os.PathLike, *, loss: LossName = "sft",
                 template: str = "qwen2", max_seq_len: int | None = None, backend: str = "auto",
                 num_threads: int = 1, window_size: int = 64):
    """A ``PackedDataLoader`` over ``shards`` in file order (no shuffle), one row per micro-batch:
    ``lm`` mode for ``sft``, ``dpo`` mode (pairs) for ``dpo``. Pairs are laid out ``separate``: each
    response then has its own copy of the image tokens, so the chosen and rejected maps are the
    gradients at their own copies (with a shared prefix the image tokens exist once and one map
    would hold both responses' gradients)."""
    from ..data import PackedDataLoader
    from ..data.config import DataConfig

    config = DataConfig(shards=str(shards), tokenizer=str(tokenizer), template=template,
                        mode="dpo" if loss == "dpo" else "lm",
                        max_seq_len=max_seq_len or (4096 if loss == "dpo" else 2048), micro_batch_rows=1,
                        window_size=window_size, shuffle=False, backend=backend, num_threads=num_threads,
                        prefetch=0, dpo_layout="separate")
    return PackedDataLoader(config, image_size=model_config.vision.image_size,
                            num_image_tokens=model_config.num_image_tokens,
                            image_token_id=model_config.image_token_id)
