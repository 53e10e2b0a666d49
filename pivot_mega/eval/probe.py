"""Classification probes of the vision encoder's features (PIVOT's ImageNet probes, on any ImageFolder).

    model = VisionLanguageModel.from_checkpoint("ckpt/dpo")
    rows = run_probes(model, "imagenet/train", "imagenet/val", per_class=50)
    write_results(rows, "probe.csv")

Features: the tower's selected layer (``model.vision`` stops there: the penultimate layer for PIVOT's
``select_layer: -2``), alone (``vit``) or through the projector (``projector``), mean-pooled over the
image tokens and L2-normalised, as the paper's ``eval_vit/eval_imagenet.py`` takes them. Probes:

- ``prototype``: class means of the normalised training features; logits ``100 · f · P``; top-1 and
  top-5. The paper's script took the means over the validation set itself (a transductive
  nearest-class-mean); ``transductive=True`` does that, the default uses the training set.
- ``logistic``: scikit-learn ``LogisticRegression`` (lbfgs, multinomial) over a grid of C. C is
  chosen by accuracy on a held-out, class-stratified part of the training set (the paper's script
  chose it on the validation set it then reported), then the model is refitted on the whole
  training set with that C and scored once on the validation set.

Accuracies are percentages. A sample counts as top-k correct when fewer than k classes score
strictly higher than its own class.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import FEATURE_KINDS, PROBES  # the names the run config's eval.probe accepts too

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# The paper script's grid (eval_vit/eval_imagenet.py): half-decades from 0.01 to 3.16.
DEFAULT_CS = (0.01, 0.03, 0.1, 0.316, 1.0, 3.16)
RESULT_COLUMNS = ("features", "probe", "top1", "top5", "C", "prototypes", "num_classes", "num_train", "num_val",
                  "checkpoint")


class ProbeError(ValueError):
    """Bad probe input: the message names the directory or image file."""


# ----------------------------------------------------------------------------------------------
# ImageFolder inputs


@dataclasses.dataclass
class ImageFolder:
    """``root/class_name/*.jpg|png...``: classes sorted by name, ``labels [N]`` int64 class numbers."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def read_image_folder(root: str | os.PathLike, *, per_class: int | None = None, seed: int = 0) -> ImageFolder:
    """Lists an ImageFolder; ``per_class`` keeps that many images of each class, drawn with ``seed``
    (the paper's "fast" probe: 50 a class). Hidden files and other suffixes are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise ProbeError(f"{root}: not a directory (expected ImageFolder layout DIR/class_name/*.jpg)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ProbeError(f"{root}: no class directories (expected ImageFolder layout DIR/class_name/*.jpg)")
    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        images = sorted(p for p in class_dir.iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ProbeError(f"{class_dir}: class directory holds no image ({', '.join(IMAGE_SUFFIXES)})")
        if per_class is not None:
            if len(images) < per_class:
                raise ProbeError(f"{class_dir}: {len(images)} image(s), fewer than --per-class {per_class}")
            images = [images[i] for i in sorted(rng.choice(len(images), size=per_class, replace=False))]
        paths += images
        labels += [label] * len(images)
    return ImageFolder(root, [d.name for d in class_dirs], paths, np.asarray(labels, dtype=np.int64))


def check_same_classes(train: ImageFolder, val: ImageFolder) -> None:
    """The two folders must name the same classes (class numbers follow the sorted names)."""
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ProbeError(f"{train.root} and {val.root} hold different classes: only in {train.root}: "
                         f"{only_train[:10]}; only in {val.root}: {only_val[:10]}")


# ----------------------------------------------------------------------------------------------
# features


def _decode_batch(decoder, paths: Sequence[Path]) -> torch.Tensor:
    """Encoded files → ``[n, 3, S, S]``; an unreadable file is an error naming it."""
    encoded = []
    for path in paths:
        try:
            encoded.append(path.read_bytes())
        except OSError as e:
            raise ProbeError(f"{path}: cannot read image: {e}") from e
    try:
        return decoder(encoded)
    except Exception as batch_error:  # noqa: BLE001 - find the file, then report it
        from PIL import UnidentifiedImageError

        from ..data.images import decode_rgb

        for path, data in zip(paths, encoded):
            try:
                decode_rgb(data)
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise ProbeError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
        raise ProbeError(f"decoding one of {[str(p) for p in paths]} failed: {batch_error}") from batch_error


def iter_image_tokens(model, paths: Sequence[Path], *, kinds: Iterable[str] = FEATURE_KINDS, batch_size: int = 32,
                      backend: str = "auto", num_threads: int = 1, progress: bool = True,
                      desc: str = "features") -> Iterator[dict[str, torch.Tensor]]:
    """Image files → one ``{kind: [n, T, D_kind]}`` per batch of ``batch_size`` files, in order: the
    per-token features that :func:`extract_features` pools and the segmentation probe classifies.
    ``vit``: the tower's selected layer, ``D = vision.hidden_size``; ``projector``: the same through
    the projector, ``D = language.hidden_size``. ``T`` runs over the patch grid row by row; the
    tensors stay on the model's device, in its dtype.

    ``model`` is a ``VisionLanguageModel`` (only ``vision`` and ``projector`` run). Images are decoded
    by the data loader's decoder (``backend``: ``auto``, ``dali`` or ``python``), the next batch while
    the model runs the current one.
    """
    kinds = list(kinds)
    unknown = sorted(set(kinds) - set(FEATURE_KINDS))
    if unknown or not kinds:
        raise ProbeError(f"feature kinds {kinds}: choose from {list(FEATURE_KINDS)}")
    if batch_size <= 0:
        raise ProbeError(f"batch_size must be > 0, got {batch_size}")
    return _image_tokens(model, list(paths), kinds, batch_size, backend, num_threads, progress, desc)


@torch.no_grad()
def _image_tokens(model, paths, kinds, batch_size, backend, num_threads, progress, desc):
    from tqdm import tqdm

    from ..data.images import make_image_decoder

    param = next(model.vision.parameters())
    decoder = make_image_decoder(backend, image_size=model.config.vision.image_size, num_threads=num_threads)
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_decode_batch, decoder, batches[0]) if batches else None
            for i in tqdm(range(len(batches)), desc=desc, unit="batch", disable=not progress):
                pixels = pending.result()
                if i + 1 < len(batches):
                    pending = pool.submit(_decode_batch, decoder, batches[i + 1])
                tokens = model.vision(pixels.to(device=param.device, dtype=param.dtype))   # [n, T, D_vit]
                out = {}
                if "vit" in kinds:
                    out["vit"] = tokens
                if "projector" in kinds:
                    out["projector"] = model.projector(tokens)                             # [n, T, D_llm]
                yield out
    finally:
        decoder.close()


def extract_features(model, paths: Sequence[Path], *, kinds: Iterable[str] = FEATURE_KINDS, batch_size: int = 32,
                     backend: str = "auto", num_threads: int = 1, progress: bool = True,
                     desc: str = "features") -> dict[str, np.ndarray]:
    """Image files → ``{kind: [N, D_kind] float32}``: the tokens of :func:`iter_image_tokens`,
    mean-pooled over the image tokens and L2-normalised."""
    kinds = list(kinds)
    batches = iter_image_tokens(model, paths, kinds=kinds, batch_size=batch_size, backend=backend,
                                num_threads=num_threads, progress=progress, desc=desc)
    out: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
    for tokens in batches:
        for kind, kind_tokens in tokens.items():
            out[kind].append(_pool(kind_tokens))
    return {kind: (torch.cat(chunks).numpy() if chunks else np.zeros((0, _width(model, kind)), np.float32))
            for kind, chunks in out.items()}


def _pool(tokens: torch.Tensor) -> torch.Tensor:
    """``[n, T, D]`` → mean over T, L2-normalised, fp32 on the CPU: ``[n, D]``."""
    return F.normalize(tokens.float().mean(dim=1), dim=-1).cpu()


def _width(model, kind: str) -> int:
    return model.config.vision.hidden_size if kind == "vit" else model.config.language.hidden_size


# ----------------------------------------------------------------------------------------------
# probes


@dataclasses.dataclass
class ProbeScore:
    """Top-1 / top-5 accuracy in percent; ``C``: the chosen inverse regularisation (logistic only);
    ``holdout``: held-out training accuracy (%) of each C tried."""

    top1: float
    top5: float
    C: float | None = None
    holdout: dict[float, float] | None = None


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> list[float]:
    """``scores [N, C]``, ``labels [N]`` → top-k accuracy (%) for each k (k capped at C)."""
    if len(labels) == 0:
        return [float("nan")] * len(ks)
    own = scores[np.arange(len(labels)), labels]
    higher = (scores > own[:, None]).sum(axis=1)
    return [float((higher < min(k, scores.shape[1])).mean() * 100.0) for k in ks]


def class_prototypes(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean feature of each class: ``features [N, D]``, ``labels [N]`` → ``[C, D]`` (not renormalised,
    as in the paper's script)."""
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ProbeError(f"classes {np.flatnonzero(counts == 0).tolist()[:10]} have no image to average")
    sums = np.zeros((num_classes, features.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, features.astype(np.float64))
    return (sums / counts[:, None]).astype(np.float32)


def prototype_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                    num_classes: int, *, transductive: bool = False) -> ProbeScore:
    """Nearest class mean: logits ``100 · f · P`` with prototypes ``P [C, D]`` from the training
    features, or from the validation features themselves with ``transductive``."""
    prototypes = class_prototypes(val_x, val_y, num_classes) if transductive else \
        class_prototypes(train_x, train_y, num_classes)
    logits = 100.0 * val_x.astype(np.float32) @ prototypes.T
    top1, top5 = topk_accuracy(logits, val_y)
    return ProbeScore(top1, top5)


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-stratified split of training positions → (fit [N_fit], held out [N_out]). Each class
    with at least two images gives ``round(fraction · n)`` of them (at least one, never all)."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_out = min(max(1, round(fraction * len(members))), len(members) - 1) if len(members) > 1 else 0
        held += members[:n_out].tolist()
        fit += members[n_out:].tolist()
    return np.sort(np.asarray(fit, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))


def _logistic(C: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=0)


def select_c(train_x: np.ndarray, train_y: np.ndarray, Cs: Sequence[float] = DEFAULT_CS, *,
             holdout_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000) -> tuple[float, dict[float, float]]:
    """Chooses C on training data only: fits on part of ``train_x`` and scores the held-out rest.

    → (best C, {C: held-out top-1 %}); the smallest C wins ties (the strongest regularisation).
    """
    Cs = [float(c) for c in Cs]
    if not Cs or any(c <= 0 for c in Cs):
        raise ProbeError(f"C grid {Cs}: give one or more values > 0")
    if len(Cs) == 1:
        return Cs[0], {}
    fit, held = holdout_split(train_y, holdout_fraction, seed)
    if len(held) == 0:
        raise ProbeError("choosing C needs a class with at least two training images to hold one out; "
                         "give a single C or more training images")
    scores = {}
    for C in sorted(Cs):
        clf = _logistic(C, max_iter).fit(train_x[fit], train_y[fit])
        scores[C] = float((clf.predict(train_x[held]) == train_y[held]).mean() * 100.0)
    best = max(scores, key=lambda c: (scores[c], -c))
    return best, scores


def logistic_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                   num_classes: int, *, Cs: Sequence[float] = DEFAULT_CS, holdout_fraction: float = 0.2,
                   seed: int = 0, max_iter: int = 1000) -> ProbeScore:
    """Logistic regression: C from :func:`select_c` (training data only), refitted on all of
    ``train_x``, then scored once on ``val_x``."""
    if len(np.unique(train_y)) < 2:
        raise ProbeError("logistic regression needs at least two classes")
    C, holdout = select_c(train_x, train_y, Cs, holdout_fraction=holdout_fraction, seed=seed, max_iter=max_iter)
    clf = _logistic(C, max_iter).fit(train_x, train_y)
    scores = np.full((len(val_x), num_classes), -np.inf)
    scores[:, clf.classes_] = clf.predict_proba(val_x)
    top1, top5 = topk_accuracy(scores, val_y)
    return ProbeScore(top1, top5, C, holdout)


# ----------------------------------------------------------------------------------------------
# the whole evaluation


def run_probes(model, train: str | os.PathLike | ImageFolder, val: str | os.PathLike | ImageFolder, *,
               per_class: int | None = None, transductive: bool = False, kinds: Iterable[str] = FEATURE_KINDS,
               probes: Iterable[str] = PROBES, Cs: Sequence[float] = DEFAULT_CS, holdout_fraction: float = 0.2,
               batch_size: int = 32, backend: str = "auto", num_threads: int = 1, seed: int = 0,
               max_iter: int = 1000, progress: bool = True, checkpoint: str = "") -> list[dict]:
    """Features of both folders, then every probe on every feature kind → one row per
    (features, probe): ``{features, probe, top1, top5, C, prototypes, num_classes, num_train,
    num_val, checkpoint}`` (accuracies in %)."""
    probes = list(probes)
    if sorted(set(probes) - set(PROBES)) or not probes:
        raise ProbeError(f"probes {probes}: choose from {list(PROBES)}")
    train = train if isinstance(train, ImageFolder) else read_image_folder(train, per_class=per_class, seed=seed)
    val = val if isinstance(val, ImageFolder) else read_image_folder(val)
    check_same_classes(train, val)
    num_classes = len(train.classes)
    log.info("probe: %d classes, %d training and %d validation images", num_classes, len(train), len(val))
    options = dict(kinds=kinds, batch_size=batch_size, backend=backend, num_threads=num_threads, progress=progress)
    need_train = "logistic" in probes or not transductive
    train_features = extract_features(model, train.paths, desc="train features", **options) if need_train else {}
    val_features = extract_features(model, val.paths, desc="val features", **options)
    rows = []
    for kind, val_x in val_features.items():
        train_x = train_features.get(kind)
        for probe in probes:
            if probe == "prototype":
                score = prototype_probe(train_x, train.labels, val_x, val.labels, num_classes,
                                        transductive=transductive)
            else:
                score = logistic_probe(train_x, train.labels, val_x, val.labels, num_classes, Cs=Cs,
                                       holdout_fraction=holdout_fraction, seed=seed, max_iter=max_iter)
            prototypes = ("val" if transductive else "train") if probe == "prototype" else ""
            rows.append({"features": kind, "probe": probe, "top1": round(score.top1, 4), "top5": round(score.top5, 4),
                         "C": score.C, "prototypes": prototypes,
                         "num_classes": num_classes, "num_train": len(train), "num_val": len(val),
                         "checkpoint": checkpoint})
            log.info("probe %s/%s: top-1 %.2f%%, top-5 %.2f%%%s", kind, probe, score.top1, score.top5,
                     f" (C {score.C})" if score.C is not None else "")
    return rows


def write_results(rows: list[dict], path: str | os.PathLike, columns: Sequence[str] = RESULT_COLUMNS) -> Path:
    """Rows → ``path``: ``.csv`` (a header of ``columns``, one line per row) or ``.json`` (a list of
    row objects)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ProbeError(f"{path}: the output must end in .csv or .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        path.write_text(json.dumps(rows, indent=2) + "\n")
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: ("" if row.get(k) is None else row.get(k)) for k in columns} for row in rows)
    return path
