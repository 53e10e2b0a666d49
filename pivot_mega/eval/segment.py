"""Patch-level segmentation probe of the vision encoder (PIVOT's "patch-seg" probe, macro recall).

    model = VisionLanguageModel.from_checkpoint("ckpt/dpo")
    rows = segment_probe(model, "voc/train", "voc/val", num_classes=21)
    write_segment_results(list(rows.values()), "segment.csv")

Features: the per-token features of the classification probe (:func:`..probe.iter_image_tokens`: the
tower's selected layer, alone or through the projector), each token L2-normalised, not pooled.

Targets: each patch token is classified into the label that covers most of its patch, the majority
of the mask pixels inside it (``ignore_index`` pixels left out; a patch with only those is ignored;
a tie goes to the smaller label). This is what "patch tokens classified" asks of one token and keeps
the probe a plain multinomial classifier; the alternative, training against the patch's label
histogram (a downsampled soft mask), would credit mixed patches more fairly but is not the paper's
figure. The mask is first resized nearest-neighbour to the square the image is resized to (the
image is stretched, as the training loader does), so patch (r, c) sees the pixels its token saw.

Head: multinomial logistic regression ``softmax(W x + b)``, zero-initialised and fitted full-batch
with L-BFGS in torch on the cached training tokens (a mean cross entropy plus ``weight_decay / 2 ·
|W|²``), on the model's device. Nothing in it is random; ``seed`` only draws the patches kept by
``patches_per_image``, so a run is repeatable.

Scores on the validation set, at the mask's own resolution (each patch's prediction upsampled
nearest-neighbour to the mask size; ``ignore_index`` pixels left out), all in percent: per-class
recall, their mean over the classes present in the validation masks (``macro_recall``, the paper's
figure), pixel accuracy and mIoU (the mean IoU over classes present in the masks or predictions).

Folders: ``DIR/images/*.jpg|png...`` with ``DIR/masks/<same stem>.png``; the VOC names
(``JPEGImages`` + ``SegmentationClass``) and the ADE20K ones (``images`` + ``annotations``) work too.
``DIR`` may also be a split inside such a layout (``ADE/images/training``: masks from
``ADE/annotations/training``) or a VOC split list (``VOC2012/ImageSets/Segmentation/val.txt``).
Masks are palette PNGs (mode ``P``: the palette indices) or index PNGs (``L``, ``I;16``, ``I``: the
values). A bad pair (no mask, an unreadable file, a mask of another mode, image and mask of different
sizes) is skipped and counted; the first few are named in warnings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .probe import FEATURE_KINDS, IMAGE_SUFFIXES, ProbeError, iter_image_tokens, write_results

log = logging.getLogger(__name__)

IMAGE_DIRS = ("images", "JPEGImages")
MASK_DIRS = ("masks", "SegmentationClass", "annotations")
MASK_MODES = ("P", "L", "I;16", "I")
# Bad pairs named one warning line each; the rest are only counted.
MAX_WARNINGS = 5
SUMMARY_COLUMNS = ("features", "macro_recall", "pixel_accuracy", "miou", "num_classes", "num_train", "num_val",
                   "skipped_train", "skipped_val", "train_patches", "checkpoint")


# ----------------------------------------------------------------------------------------------
# image + mask folders


@dataclasses.dataclass
class SegmentationFolder:
    """Usable pairs ``images[i]`` / ``masks[i]``, and ``skipped``: (file, why) of the bad pairs."""

    root: Path
    images: list[Path]
    masks: list[Path]
    skipped: list[tuple[Path, str]]

    def __len__(self) -> int:
        return len(self.images)


def _layout(root: Path) -> tuple[Path, Path, list[str] | None]:
    """→ (image folder, mask folder, stems of a split list or None)."""
    if root.is_file() and root.suffix == ".txt":     # VOC2012/ImageSets/Segmentation/train.txt
        stems = [line.split()[0] for line in root.read_text().splitlines() if line.strip()]
        voc = root.parent.parent.parent
        if not ((voc / "JPEGImages").is_dir() and (voc / "SegmentationClass").is_dir()):
            raise ProbeError(f"{root}: a split list must sit in VOC's ImageSets/Segmentation/, next to "
                             f"JPEGImages/ and SegmentationClass/ (not found in {voc})")
        return voc / "JPEGImages", voc / "SegmentationClass", stems
    if root.is_dir():
        for image_dir in IMAGE_DIRS:
            for mask_dir in MASK_DIRS:
                if (root / image_dir).is_dir() and (root / mask_dir).is_dir():
                    return root / image_dir, root / mask_dir, None
        if root.parent.name in IMAGE_DIRS:            # ADE/images/training → ADE/annotations/training
            for mask_dir in MASK_DIRS:
                if (root.parent.parent / mask_dir / root.name).is_dir():
                    return root, root.parent.parent / mask_dir / root.name, None
    raise ProbeError(f"{root}: expected DIR/images/ + DIR/masks/ (or VOC's JPEGImages/ + SegmentationClass/, "
                     f"ADE20K's images/ + annotations/, a split such as ADE/images/training, or a VOC split list)")


def read_segmentation_folder(root: str | os.PathLike) -> SegmentationFolder:
    """Lists the image/mask pairs of ``root`` (see the module docstring for the layouts), checking each
    pair's files, mask mode and sizes from the file headers; bad pairs go to ``skipped``."""
    root = Path(root)
    image_dir, mask_dir, stems = _layout(root)
    if stems is None:
        candidates = sorted(p for p in image_dir.iterdir()
                            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        candidates = [next((image_dir / (stem + s) for s in IMAGE_SUFFIXES if (image_dir / (stem + s)).is_file()),
                           image_dir / (stem + ".jpg")) for stem in stems]
    if not candidates:
        splits = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and (mask_dir / p.name).is_dir()) \
            if image_dir.is_dir() else []
        hint = f"; for a split give {image_dir / splits[0]} (splits: {', '.join(splits)})" if splits else ""
        raise ProbeError(f"{image_dir}: no image ({', '.join(IMAGE_SUFFIXES)}){hint}")
    images, masks, skipped, seen = [], [], [], set()
    for image in candidates:
        mask = mask_dir / (image.stem + ".png")
        why = "another image has the same stem" if image.stem in seen else _pair_problem(image, mask)
        seen.add(image.stem)
        if why:
            skipped.append((image, why))
        else:
            images.append(image)
            masks.append(mask)
    return SegmentationFolder(root, images, masks, skipped)


def _pair_problem(image: Path, mask: Path) -> str | None:
    from PIL import Image

    if not image.is_file():
        return "no such image"
    if not mask.is_file():
        return f"no mask {mask}"
    sizes = []
    for path in (image, mask):
        try:
            with Image.open(path) as opened:
                sizes.append(opened.size)
                mode = opened.mode
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            return f"cannot read {path.name} ({type(e).__name__}: {e})"
    if mode not in MASK_MODES:
        return f"mask {mask.name} has mode {mode}: give a palette ('P') or index ('L') PNG"
    if sizes[0] != sizes[1]:
        return f"image is {sizes[0][0]}x{sizes[0][1]} but mask {mask.name} is {sizes[1][0]}x{sizes[1][1]}"
    return None


def _report_skipped(folder: SegmentationFolder, name: str) -> None:
    for path, why in folder.skipped[:MAX_WARNINGS]:
        log.warning("segment: %s: %s: skipped", path, why)
    if folder.skipped:
        more = len(folder.skipped) - MAX_WARNINGS
        log.warning("segment: skipped %d bad pair(s) of %d in %s %s%s", len(folder.skipped),
                    len(folder.skipped) + len(folder), name, folder.root,
                    f" ({more} not named above)" if more > 0 else "")


def read_mask(path: Path, num_classes: int, ignore_index: int) -> np.ndarray:
    """Mask PNG → ``[H, W]`` int64 labels; a label outside ``0..num_classes-1`` that is not
    ``ignore_index`` is an error naming the file."""
    from PIL import Image

    with Image.open(path) as image:
        mask = np.asarray(image).astype(np.int64)
    bad = (mask != ignore_index) & ((mask < 0) | (mask >= num_classes))
    if bad.any():
        values = np.unique(mask[bad])
        raise ProbeError(f"{path}: label(s) {values[:10].tolist()} outside 0..{num_classes - 1} "
                         f"(--num-classes {num_classes}) and not --ignore-index {ignore_index}")
    return mask


# ----------------------------------------------------------------------------------------------
# patch labels and upsampling (nearest-neighbour, pixel centres)


def nearest_index(source: int, target: int) -> np.ndarray:
    """For each of ``target`` positions, the source position whose centre is nearest: ``[target]``
    (PIL's NEAREST rule, ``floor((i + 0.5) · source / target)``, in integers)."""
    return (2 * np.arange(target, dtype=np.int64) + 1) * source // (2 * target)


def patch_labels(mask: np.ndarray, *, image_size: int, grid: int, num_classes: int, ignore_index: int) -> np.ndarray:
    """``mask [H, W]`` → ``[grid · grid]`` int64 majority label of each patch, row by row, as the
    tokens; -1 for a patch with only ``ignore_index`` pixels. The mask is resized nearest to
    ``image_size²`` first, as its image is resized to that square."""
    patch = image_size // grid
    square = mask[nearest_index(mask.shape[0], image_size)][:, nearest_index(mask.shape[1], image_size)]
    blocks = square[:grid * patch, :grid * patch].reshape(grid, patch, grid, patch)
    blocks = blocks.transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)          # [patches, pixels]
    codes = np.where(blocks == ignore_index, num_classes, blocks)                       # ignored → extra bin
    offsets = np.arange(grid * grid, dtype=np.int64)[:, None] * (num_classes + 1)
    counts = np.bincount((codes + offsets).ravel(), minlength=grid * grid * (num_classes + 1))
    counts = counts.reshape(grid * grid, num_classes + 1)[:, :num_classes]
    return np.where(counts.sum(axis=1) > 0, counts.argmax(axis=1), -1)


def upsample_patches(predictions: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[grid · grid]`` patch predictions (row by row) → ``[height, width]``, nearest-neighbour."""
    grid = math.isqrt(len(predictions))
    square = predictions.reshape(grid, grid)
    return square[nearest_index(grid, height)][:, nearest_index(grid, width)]


# ----------------------------------------------------------------------------------------------
# metrics


def confusion_matrix(predictions: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """Pixels → ``[K, K]`` int64 counts, rows the true class, columns the predicted one;
    ``ignore_index`` pixels of ``target`` left out."""
    keep = target != ignore_index
    codes = target[keep].astype(np.int64) * num_classes + predictions[keep].astype(np.int64)
    return np.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: np.ndarray) -> dict:
    """``[K, K]`` confusion → percentages: ``per_class_recall [K]`` (NaN for a class absent from the
    targets), ``macro_recall`` (their mean over the present classes), ``pixel_accuracy``, ``miou``
    (IoU averaged over the classes with a non-empty union) and ``iou [K]``."""
    confusion = confusion.astype(np.float64)
    hits, truth, predicted = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    union = truth + predicted - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(truth > 0, hits / truth, np.nan) * 100.0
        iou = np.where(union > 0, hits / union, np.nan) * 100.0
    total = confusion.sum()
    return {"per_class_recall": recall,
            "macro_recall": float(np.nanmean(recall)) if (truth > 0).any() else float("nan"),
            "pixel_accuracy": float(hits.sum() / total * 100.0) if total else float("nan"),
            "miou": float(np.nanmean(iou)) if (union > 0).any() else float("nan"),
            "iou": iou}


# ----------------------------------------------------------------------------------------------
# the head


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, max_iter: int = 100,
                    weight_decay: float = 1e-4, chunk_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: ``features [N, D]`` (any float dtype, on the device to fit on),
    ``labels [N]`` → ``(weight [K, D], bias [K])`` float32, fitted full-batch by L-BFGS from zeros.

    The loss is accumulated over chunks of ``chunk_size`` rows, so only the cached features (and one
    chunk in float32) are ever in memory.
    """
    if len(labels) == 0:
        raise ProbeError("no labelled training patch: every training mask is ignore-index only")
    device = features.device
    weight = torch.zeros(num_classes, features.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        total = torch.zeros((), device=device)
        for start in range(0, len(labels), chunk_size):
            logits = features[start:start + chunk_size].float() @ weight.T + bias
            loss = F.cross_entropy(logits, labels[start:start + chunk_size], reduction="sum") / len(labels)
            loss.backward()
            total += loss.detach()
        penalty = 0.5 * weight_decay * weight.square().sum()
        penalty.backward()
        return total + penalty.detach()

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


# ----------------------------------------------------------------------------------------------
# the whole evaluation


def _grid(model) -> int:
    vision = model.config.vision
    return vision.image_size // vision.patch_size


def _normalised(tokens: torch.Tensor) -> torch.Tensor:
    """``[n, T, D]`` → each token L2-normalised in float32, stored as float16 (unit-norm rows fit it
    well, and the cache of every training token is the probe's largest memory)."""
    return F.normalize(tokens.float(), dim=-1).half()


def _training_tokens(model, folder: SegmentationFolder, kinds: list[str], num_classes: int, ignore_index: int,
                     patches_per_image: int | None, seed: int, options: dict) -> tuple[dict, torch.Tensor]:
    """→ ({kind: [P, D] float16 on the model's device}, labels [P] int64): the labelled patches."""
    grid, image_size = _grid(model), model.config.vision.image_size
    rng = np.random.default_rng(seed)
    picks, labels = [], []
    for mask_path in folder.masks:
        patch = patch_labels(read_mask(mask_path, num_classes, ignore_index), image_size=image_size, grid=grid,
                             num_classes=num_classes, ignore_index=ignore_index)
        keep = np.flatnonzero(patch >= 0)
        if patches_per_image is not None and len(keep) > patches_per_image:
            keep = np.sort(rng.choice(keep, size=patches_per_image, replace=False))
        picks.append(keep)
        labels.append(patch[keep])
    chunks: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
    first = 0
    for tokens in iter_image_tokens(model, folder.images, kinds=kinds, desc="train features", **options):
        for kind, kind_tokens in tokens.items():
            _check_grid(kind_tokens, grid)
            for k, keep in enumerate(picks[first:first + len(kind_tokens)]):
                chunks[kind].append(_normalised(kind_tokens[k, torch.as_tensor(keep, device=kind_tokens.device)]))
        first += len(next(iter(tokens.values())))
    device = next(model.vision.parameters()).device
    return ({kind: torch.cat(c) for kind, c in chunks.items()},
            torch.as_tensor(np.concatenate(labels), device=device))


def _check_grid(tokens: torch.Tensor, grid: int) -> None:
    if tokens.shape[1] != grid * grid:
        raise ProbeError(f"the encoder gives {tokens.shape[1]} tokens an image, not the {grid}x{grid} patch grid "
                         f"the segmentation probe labels")


def segment_probe(model, train: str | os.PathLike | SegmentationFolder, val: str | os.PathLike | SegmentationFolder,
                  num_classes: int, *, features: str | Iterable[str] = "both", ignore_index: int = 255,
                  max_iter: int = 100, weight_decay: float = 1e-4, patches_per_image: int | None = None,
                  batch_size: int = 32, backend: str = "auto", num_threads: int = 1, seed: int = 0,
                  progress: bool = True, checkpoint: str = "") -> dict[str, dict]:
    """Fits a linear head on the training patches of each feature kind and scores it on ``val``.

    ``features``: ``vit``, ``projector``, ``both`` or a list of kinds. → ``{kind: row}``, each row
    ``{features, macro_recall, pixel_accuracy, miou, per_class_recall [K], num_classes, num_train,
    num_val, skipped_train, skipped_val, train_patches, checkpoint}`` (scores in %, NaN where a class is
    absent). ``patches_per_image`` caps the training patches drawn (with ``seed``) from each image.
    """
    kinds = list(FEATURE_KINDS) if features == "both" else [features] if isinstance(features, str) else list(features)
    if not kinds or sorted(set(kinds) - set(FEATURE_KINDS)):
        raise ProbeError(f"features {kinds}: choose vit, projector or both")
    if num_classes < 2:
        raise ProbeError(f"num_classes must be >= 2, got {num_classes}")
    if patches_per_image is not None and patches_per_image <= 0:
        raise ProbeError(f"patches_per_image must be > 0, got {patches_per_image}")
    folders = {}
    for name, folder in (("train", train), ("val", val)):
        folder = folder if isinstance(folder, SegmentationFolder) else read_segmentation_folder(folder)
        _report_skipped(folder, name)
        if not len(folder):
            raise ProbeError(f"{folder.root}: no usable image/mask pair ({len(folder.skipped)} skipped)")
        folders[name] = folder
    train, val = folders["train"], folders["val"]
    log.info("segment: %d classes, %d training and %d validation images", num_classes, len(train), len(val))
    options = dict(batch_size=batch_size, backend=backend, num_threads=num_threads, progress=progress)

    train_x, train_y = _training_tokens(model, train, kinds, num_classes, ignore_index, patches_per_image, seed,
                                        options)
    heads = {kind: fit_linear_head(train_x.pop(kind), train_y, num_classes, max_iter=max_iter,
                                   weight_decay=weight_decay) for kind in kinds}

    grid = _grid(model)
    confusion = {kind: np.zeros((num_classes, num_classes), np.int64) for kind in kinds}
    first = 0
    for tokens in iter_image_tokens(model, val.images, kinds=kinds, desc="val features", **options):
        masks = [read_mask(p, num_classes, ignore_index) for p in val.masks[first:first + batch_size]]
        for kind, kind_tokens in tokens.items():
            _check_grid(kind_tokens, grid)
            weight, bias = heads[kind]
            predictions = (_normalised(kind_tokens).float() @ weight.T + bias).argmax(dim=-1).cpu().numpy()
            for mask, patch_predictions in zip(masks, predictions):
                confusion[kind] += confusion_matrix(upsample_patches(patch_predictions, *mask.shape), mask,
                                                    num_classes, ignore_index)
        first += len(masks)

    rows = {}
    for kind in kinds:
        score = segmentation_scores(confusion[kind])
        rows[kind] = {"features": kind, "macro_recall": round(score["macro_recall"], 4),
                      "pixel_accuracy": round(score["pixel_accuracy"], 4), "miou": round(score["miou"], 4),
                      "per_class_recall": [round(float(r), 4) for r in score["per_class_recall"]],
                      "num_classes": num_classes, "num_train": len(train), "num_val": len(val),
                      "skipped_train": len(train.skipped), "skipped_val": len(val.skipped),
                      "train_patches": len(train_y), "checkpoint": checkpoint}
        log.info("segment %s: macro recall %.2f%%, pixel accuracy %.2f%%, mIoU %.2f%%", kind,
                 score["macro_recall"], score["pixel_accuracy"], score["miou"])
    return rows


def write_segment_results(rows: list[dict], path: str | os.PathLike) -> Path:
    """Rows → ``.json`` (a list of row objects, NaN as null) or ``.csv`` (one line per row, the
    per-class recalls as columns ``recall_0 ... recall_{K-1}``, NaN as empty)."""
    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value

    if Path(path).suffix.lower() == ".json":
        return write_results([{k: ([clean(v) for v in value] if isinstance(value, list) else clean(value))
                               for k, value in row.items()} for row in rows], path)
    num_classes = max((len(row["per_class_recall"]) for row in rows), default=0)
    flat = [{**{k: clean(v) for k, v in row.items() if k != "per_class_recall"},
             **{f"recall_{c}": clean(r) for c, r in enumerate(row["per_class_recall"])}} for row in rows]
    return write_results(flat, path, columns=(*SUMMARY_COLUMNS, *(f"recall_{c}" for c in range(num_classes))))
