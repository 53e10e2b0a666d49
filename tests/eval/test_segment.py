"""Segmentation probe: coloured regions are learnt and shuffled masks are not, the metrics equal a plain
numpy count, patch labels follow the token grid, bad pairs are skipped and counted, the command line."""

import csv
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from pivot_mega.cli import main
from pivot_mega.eval.probe import ProbeError
from pivot_mega.eval.segment import (confusion_matrix, patch_labels, read_segmentation_folder, segment_probe,
                                     segmentation_scores, upsample_patches, write_segment_results)
from tests.data.helpers import encode
from tests.eval.conftest import tiny_model

# Class c is painted in COLOURS[c]; tiny model: 64 px, patch 16 → a 4 x 4 token grid.
COLOURS = np.array([(30, 60, 220), (40, 190, 60), (220, 40, 40), (230, 220, 50), (128, 128, 128), (150, 40, 170)])
NUM_CLASSES = len(COLOURS)
GRID = 4


def scene(rng, height, width, num_classes=NUM_CLASSES):
    """Rectangles of the classes on the 4 x 4 cell grid the image is stretched to (cell edges at
    multiples of height/4 and width/4, so each patch holds one label) → (image [H, W, 3], mask [H, W])."""
    cells = rng.integers(0, num_classes, (GRID, GRID))
    rows = np.arange(height) * GRID // height
    cols = np.arange(width) * GRID // width
    mask = cells[rows][:, cols].astype(np.uint8)
    image = np.clip(COLOURS[mask] + rng.integers(-20, 21, (height, width, 3)), 0, 255).astype(np.uint8)
    return image, mask


def palette_png(mask, path):
    image = Image.fromarray(mask, mode="P")
    image.putpalette([v for colour in COLOURS for v in colour] + [0] * (768 - 3 * len(COLOURS)))
    image.save(path)


def write_split(root, rng, count, size=(96, 80), image_dir="images", mask_dir="masks", palette=True):
    (root / image_dir).mkdir(parents=True)
    (root / mask_dir).mkdir(parents=True)
    for i in range(count):
        image, mask = scene(rng, *size)
        fmt, suffix = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
        (root / image_dir / f"{i:03d}.{suffix}").write_bytes(encode(image, fmt))
        if palette:
            palette_png(mask, root / mask_dir / f"{i:03d}.png")
        else:
            Image.fromarray(mask, mode="L").save(root / mask_dir / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The head's L-BFGS runs hundreds of tiny ops: on a busy two-core box a second thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    rng = np.random.default_rng(0)
    return write_split(tmp / "train", rng, 12), write_split(tmp / "val", rng, 6, palette=False)


@pytest.fixture(scope="module")
def model(image_token):
    return tiny_model(image_token, seed=1)


def test_coloured_regions_are_learnt_and_shuffled_masks_are_not(splits, model, tmp_path):
    rows = segment_probe(model, *splits, NUM_CLASSES, backend="python", batch_size=5, progress=False)
    assert list(rows) == ["vit", "projector"]
    for row in rows.values():
        assert row["num_train"] == 12 and row["num_val"] == 6 and row["train_patches"] == 12 * 16
        assert row["macro_recall"] >= 95.0 and row["pixel_accuracy"] >= 95.0 and row["miou"] >= 90.0, row
        assert min(row["per_class_recall"]) >= 85.0, row
    # Repeatable: the same numbers again.
    again = segment_probe(model, *splits, NUM_CLASSES, features="vit", backend="python", progress=False)
    assert again["vit"] == rows["vit"]
    # At most 5 patches drawn from each training image still suffice here.
    few = segment_probe(model, *splits, NUM_CLASSES, features="projector", patches_per_image=5, seed=3,
                        backend="python", progress=False)["projector"]
    assert few["train_patches"] == 12 * 5 and few["macro_recall"] >= 90.0, few

    # Control: each training mask moved to another image (a cyclic shift: none stays on its own) → chance.
    # The head still maps each colour to one label, so macro recall is the share of colours it maps
    # right by luck: 1/6 expected; measured 0-22.5% over all 11 shifts, held to <= 35% on three.
    for shift in (1, 4, 7):
        train = read_segmentation_folder(splits[0])
        train.masks = train.masks[shift:] + train.masks[:shift]
        shuffled = segment_probe(model, train, splits[1], NUM_CLASSES, backend="python", progress=False)
        assert all(row["macro_recall"] <= 35.0 for row in shuffled.values()), (shift, shuffled)


def test_metrics_equal_a_plain_numpy_count():
    ignore = 255
    target = np.array([[0, 0, 1, 1],
                       [0, 2, 1, ignore],
                       [2, 2, 2, 2]])
    predicted = np.array([[0, 1, 1, 1],
                          [0, 2, 0, 0],
                          [2, 1, 2, 3]])
    scores = segmentation_scores(confusion_matrix(predicted, target, 5, ignore))
    valid = target != ignore
    recall, iou = [], []
    for c in range(5):
        truth, guess = (target == c) & valid, (predicted == c) & valid
        recall.append(100.0 * (truth & guess).sum() / truth.sum() if truth.sum() else np.nan)
        union = (truth | guess).sum()
        iou.append(100.0 * (truth & guess).sum() / union if union else np.nan)
    np.testing.assert_allclose(scores["per_class_recall"], recall)
    np.testing.assert_allclose(scores["iou"], iou)
    # By hand: recalls 2/3, 2/3, 3/5 (classes 3, 4 absent); 7 of 11 pixels; IoUs 2/4, 2/5, 3/5, 0 (class 3
    # only predicted), class 4 neither predicted nor present (left out of the mean).
    np.testing.assert_allclose(scores["per_class_recall"][:3], [200 / 3, 200 / 3, 60.0])
    assert np.isnan(scores["per_class_recall"][3:]).all()
    assert scores["macro_recall"] == pytest.approx((200 / 3 + 200 / 3 + 60.0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(700 / 11)
    assert scores["miou"] == pytest.approx((50.0 + 40.0 + 60.0 + 0.0) / 4)


def test_patch_labels_follow_the_token_grid():
    # A 6 x 8 mask stretched to 4 x 4 pixels of 2 x 2 patches (image_size 4, grid 2).
    mask = np.full((6, 8), 3)
    mask[:3, :4] = 1                    # top-left patch
    mask[:3, 4:] = 255                  # top-right: all ignored
    mask[3:, 4:] = 2
    mask[3, 4] = 0                      # a minority pixel, outside the nearest samples anyway
    labels = patch_labels(mask, image_size=4, grid=2, num_classes=4, ignore_index=255)
    np.testing.assert_array_equal(labels, [1, -1, 3, 2])        # row by row, as the tokens
    # Majority over the patch's pixels, ignore left out; a tie goes to the smaller label.
    mask = np.array([[1, 2, 2, 0], [255, 2, 0, 2], [1, 1, 0, 3], [1, 255, 3, 3]])
    labels = patch_labels(mask, image_size=4, grid=2, num_classes=4, ignore_index=255)
    expected = []
    for r in range(2):
        for c in range(2):
            block = mask[2 * r:2 * r + 2, 2 * c:2 * c + 2].ravel()
            counts = np.bincount(block[block != 255], minlength=4)
            expected.append(int(np.argmax(counts)))
    np.testing.assert_array_equal(labels, expected)
    assert expected == [2, 0, 1, 3]                             # the top-right patch a 2-2 tie
    # Upsampling back: nearest, pixel centres (column 2 of 5 has its centre on the patch edge: the right one).
    up = upsample_patches(np.array([0, 1, 2, 3]), 3, 5)
    np.testing.assert_array_equal(up, [[0, 0, 1, 1, 1], [2, 2, 3, 3, 3], [2, 2, 3, 3, 3]])


def test_bad_pairs_are_skipped_and_counted(tmp_path, splits, model, caplog):
    rng = np.random.default_rng(3)
    train = write_split(tmp_path / "train", rng, 4)
    (train / "masks" / "001.png").unlink()                                       # no mask
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(train / "masks" / "002.png")  # wrong size
    Image.fromarray(np.zeros((96, 80, 3), np.uint8)).save(train / "masks" / "003.png")  # RGB mask
    (train / "images" / "004.png").write_bytes(b"not an image")
    palette_png(np.zeros((96, 80), np.uint8), train / "masks" / "004.png")
    folder = read_segmentation_folder(train)
    assert [p.name for p in folder.images] == ["000.jpg"]
    why = {p.name: reason for p, reason in folder.skipped}
    assert set(why) == {"001.png", "002.jpg", "003.png", "004.png"}
    assert "no mask" in why["001.png"] and "image is 80x96 but mask 002.png is 10x10" == why["002.jpg"]
    assert "mode RGB" in why["003.png"] and "cannot read 004.png" in why["004.png"]
    with caplog.at_level(logging.WARNING, logger="pivot_mega.eval.segment"):
        rows = segment_probe(model, train, splits[1], NUM_CLASSES, features="vit", backend="python",
                             progress=False)
    assert rows["vit"]["skipped_train"] == 4 and rows["vit"]["skipped_val"] == 0 and rows["vit"]["num_train"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("002.jpg" in w and "skipped" in w for w in warnings)
    assert warnings[-1].startswith("segment: skipped 4 bad pair(s) of 5 in train")
    # A label the classes do not cover is an error naming the mask (not a skip).
    with pytest.raises(ProbeError, match=r"000\.png: label\(s\) \[[2-5, ]+\] outside 0\.\.1 \(--num-classes 2\)"):
        segment_probe(model, train, splits[1], 2, features="vit", backend="python", progress=False)


def test_voc_and_ade_layouts(tmp_path):
    rng = np.random.default_rng(4)
    voc = write_split(tmp_path / "VOC2012", rng, 3, image_dir="JPEGImages", mask_dir="SegmentationClass")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("000\n002\n")
    assert len(read_segmentation_folder(voc)) == 3
    listed = read_segmentation_folder(voc / "ImageSets" / "Segmentation" / "val.txt")
    assert [p.name for p in listed.masks] == ["000.png", "002.png"] and not listed.skipped
    ade = tmp_path / "ADE"
    write_split(ade, rng, 2, image_dir="images/training", mask_dir="annotations/training")
    assert [p.name for p in read_segmentation_folder(ade / "images" / "training").images] == ["000.jpg", "001.png"]
    with pytest.raises(ProbeError, match=r"ADE/images: no image .*; for a split give .*ADE/images/training "
                                         r"\(splits: training\)"):
        read_segmentation_folder(ade)
    with pytest.raises(ProbeError, match="expected DIR/images/ \\+ DIR/masks/"):
        read_segmentation_folder(tmp_path)


def test_results_files(tmp_path):
    rows = [{"features": "vit", "macro_recall": 50.0, "pixel_accuracy": 60.0, "miou": 40.0,
             "per_class_recall": [100.0, 0.0, float("nan")], "num_classes": 3, "num_train": 2, "num_val": 1,
             "skipped_train": 1, "skipped_val": 0, "train_patches": 32, "checkpoint": "c"}]
    with open(write_segment_results(rows, tmp_path / "s.csv"), newline="") as f:
        lines = list(csv.DictReader(f))
    assert lines[0]["recall_0"] == "100.0" and lines[0]["recall_2"] == "" and lines[0]["macro_recall"] == "50.0"
    saved = json.loads(write_segment_results(rows, tmp_path / "s.json").read_text())
    assert saved[0]["per_class_recall"] == [100.0, 0.0, None] and saved[0]["skipped_train"] == 1


def test_command_line(tmp_path, splits, tiny_ckpt, capsys):
    for out in ("seg.csv", "seg.json"):
        code = main(["eval", "segment", "--ckpt", str(tiny_ckpt), "--train", str(splits[0]), "--val", str(splits[1]),
                     "--num-classes", "6", "--backend", "python", "--no-progress", "--out", str(tmp_path / out)])
        assert code == 0
    printed = capsys.readouterr().out
    assert "vit       macro recall" in printed and "projector macro recall" in printed and "wrote" in printed
    with open(tmp_path / "seg.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    saved = json.loads((tmp_path / "seg.json").read_text())
    assert [r["features"] for r in lines] == [r["features"] for r in saved] == ["vit", "projector"]
    assert float(lines[0]["macro_recall"]) == saved[0]["macro_recall"] >= 95.0
    assert len(saved[0]["per_class_recall"]) == 6 and "recall_5" in lines[0]
    # Bad input: one line naming the folder, exit code 2.
    code = main(["eval", "segment", "--ckpt", str(tiny_ckpt), "--train", str(tmp_path), "--val", str(splits[1]),
                 "--num-classes", "6", "--backend", "python", "--no-progress", "--out", str(tmp_path / "x.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"pivot-mega eval segment: error: {tmp_path}: expected DIR/images/")
