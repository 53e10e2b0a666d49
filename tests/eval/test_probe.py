"""Probes: separable classes score high, the prototype probe equals a plain numpy version, C never sees
val, results files, and bad folders named in the errors."""

import csv
import dataclasses
import json

import numpy as np
import pytest

from pivot_mega.cli import main
from pivot_mega.data.images import dali_unavailable_reason
from pivot_mega.eval import probe as probe_module
from pivot_mega.eval.probe import (ProbeError, extract_features, logistic_probe, prototype_probe, read_image_folder,
                                   run_probes, select_c, write_results)
from tests.data.helpers import encode
from tests.eval.conftest import tiny_model

COLOURS = {"blue": (30, 60, 220), "green": (40, 190, 60), "red": (220, 40, 40), "yellow": (230, 220, 50),
           "grey": (128, 128, 128), "purple": (150, 40, 170)}


def write_folder(root, rng, per_class, classes=COLOURS, size=(40, 52)):
    """Solid-colour classes with pixel noise, JPEG and PNG mixed."""
    for name, colour in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-20, 21, (*size, 3))
            image = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
            fmt, suffix = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            (root / name / f"{i}.{suffix}").write_bytes(encode(image, fmt))
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(0)
    return write_folder(tmp / "train", rng, 8), write_folder(tmp / "val", rng, 4)


@pytest.fixture(scope="module")
def model(image_token):
    return tiny_model(image_token, seed=1)


def test_separable_classes_score_high(folders, model):
    rows = run_probes(model, *folders, backend="python", batch_size=10, progress=False, Cs=(0.01, 0.1, 1.0))
    assert [(r["features"], r["probe"]) for r in rows] == [("vit", "prototype"), ("vit", "logistic"),
                                                            ("projector", "prototype"), ("projector", "logistic")]
    for row in rows:
        assert row["num_classes"] == 6 and row["num_train"] == 48 and row["num_val"] == 24
        assert row["top1"] >= 95.0 and row["top5"] == 100.0, row
        assert (row["C"] in (0.01, 0.1, 1.0)) == (row["probe"] == "logistic")
    # Control: the same images with training labels shuffled give chance-level probes.
    train = read_image_folder(folders[0])
    shuffled = dataclasses.replace(train, labels=np.random.default_rng(0).permutation(train.labels))
    rows = run_probes(model, shuffled, folders[1], backend="python", batch_size=16, progress=False, Cs=(0.1, 1.0))
    assert all(row["top1"] <= 50.0 for row in rows), rows
    # Transductive prototypes and a subset of the training images.
    rows = run_probes(model, *folders, per_class=3, transductive=True, kinds=["projector"], probes=["prototype"],
                      backend="python", progress=False)
    assert len(rows) == 1 and rows[0]["prototypes"] == "val" and rows[0]["top1"] >= 95.0


def test_features_are_pooled_normalised_and_batch_independent(folders, model):
    train = read_image_folder(folders[0])
    paths = train.paths[:7]
    one = extract_features(model, paths, batch_size=7, backend="python", progress=False)
    split = extract_features(model, paths, batch_size=3, backend="python", progress=False)
    assert one["vit"].shape == (7, 64) and one["projector"].shape == (7, 64)
    for kind in ("vit", "projector"):
        np.testing.assert_allclose(np.linalg.norm(one[kind], axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(one[kind], split[kind], atol=1e-6)


@pytest.mark.skipif(dali_unavailable_reason() is not None, reason="DALI is not installed")
def test_dali_and_python_decoders_give_the_same_features(folders, model):
    paths = read_image_folder(folders[1]).paths[:6]
    dali = extract_features(model, paths, batch_size=4, backend="dali", progress=False)
    python = extract_features(model, paths, batch_size=4, backend="python", progress=False)
    for kind in ("vit", "projector"):
        np.testing.assert_allclose(dali[kind], python[kind], atol=1e-3)


def _naive_topk(features, labels, prototypes, k):
    hits = 0
    for feature, label in zip(features, labels):
        logits = [100.0 * float(np.dot(feature, p)) for p in prototypes]
        order = sorted(range(len(logits)), key=lambda c: -logits[c])
        hits += label in order[:k]
    return 100.0 * hits / len(labels)


@pytest.mark.parametrize("transductive", [False, True])
def test_prototype_probe_equals_a_naive_numpy_version(seed, transductive):
    rng = np.random.default_rng(seed)
    num_classes, dim = 9, 16
    train_y, val_y = rng.integers(0, num_classes, 90), rng.integers(0, num_classes, 40)
    train_y[:num_classes], val_y[:num_classes] = np.arange(num_classes), np.arange(num_classes)
    train_x, val_x = (rng.normal(size=(n, dim)).astype(np.float32) for n in (90, 40))
    source_x, source_y = (val_x, val_y) if transductive else (train_x, train_y)
    prototypes = [np.mean([x for x, y in zip(source_x, source_y) if y == c], axis=0) for c in range(num_classes)]
    score = prototype_probe(train_x, train_y, val_x, val_y, num_classes, transductive=transductive)
    assert score.top1 == pytest.approx(_naive_topk(val_x, val_y, prototypes, 1))
    assert score.top5 == pytest.approx(_naive_topk(val_x, val_y, prototypes, 5))


class _Spy:
    """Wraps LogisticRegression and records every array it is fitted on or asked about."""

    seen: list = []

    def __init__(self, C, max_iter):
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=0)
        self.C = C

    def fit(self, x, y):
        _Spy.seen.append(("fit", self.C, x.copy()))
        self.model.fit(x, y)
        self.classes_ = self.model.classes_
        return self

    def predict(self, x):
        _Spy.seen.append(("predict", self.C, x.copy()))
        return self.model.predict(x)

    def predict_proba(self, x):
        _Spy.seen.append(("predict_proba", self.C, x.copy()))
        return self.model.predict_proba(x)


def test_logistic_c_is_chosen_without_the_validation_set(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    num_classes, dim = 4, 8
    centres = rng.normal(size=(num_classes, dim)) * 1.5
    train_y, val_y = np.repeat(np.arange(num_classes), 15), np.repeat(np.arange(num_classes), 6)
    train_x = (centres[train_y] + rng.normal(size=(60, dim))).astype(np.float32)
    val_x = (centres[val_y] + rng.normal(size=(24, dim))).astype(np.float32)
    monkeypatch.setattr(probe_module, "_logistic", _Spy)
    _Spy.seen = []
    score = logistic_probe(train_x, train_y, val_x, val_y, num_classes, Cs=(0.01, 0.1, 1.0), seed=3)

    # Every C was fitted and scored on training rows only; val was touched once, by the final model.
    *selection, refit, final = _Spy.seen
    assert [(kind, c) for kind, c, _ in selection] == [(k, c) for c in (0.01, 0.1, 1.0) for k in ("fit", "predict")]
    train_rows = {row.tobytes() for row in train_x}
    for _, _, x in selection:
        assert all(row.tobytes() in train_rows for row in x)
    fitted, scored = selection[0][2], selection[1][2]
    assert len(fitted) + len(scored) == len(train_x) and len(scored) == 12   # 20 % of each class held out
    assert refit[:2] == ("fit", score.C) and np.array_equal(refit[2], train_x)
    assert final[:2] == ("predict_proba", score.C) and np.array_equal(final[2], val_x)
    assert set(score.holdout) == {0.01, 0.1, 1.0}

    # Nothing about val changes the choice; select_c takes no val at all.
    _Spy.seen = []
    assert logistic_probe(train_x, train_y, rng.normal(size=val_x.shape).astype(np.float32), val_y[::-1].copy(),
                          num_classes, Cs=(0.01, 0.1, 1.0), seed=3).C == score.C
    assert select_c(train_x, train_y, (0.01, 0.1, 1.0), seed=3)[0] == score.C


def test_results_are_written_as_csv_and_json(tmp_path):
    rows = [{"features": "vit", "probe": "prototype", "top1": 50.0, "top5": 90.0, "C": None, "prototypes": "train",
             "num_classes": 6, "num_train": 48, "num_val": 24, "checkpoint": "ckpt"},
            {"features": "vit", "probe": "logistic", "top1": 60.0, "top5": 95.0, "C": 0.316, "prototypes": "",
             "num_classes": 6, "num_train": 48, "num_val": 24, "checkpoint": "ckpt"}]
    write_results(rows, tmp_path / "out" / "probe.csv")
    with open(tmp_path / "out" / "probe.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert [r["probe"] for r in read] == ["prototype", "logistic"] and read[1]["C"] == "0.316" and read[0]["C"] == ""
    write_results(rows, tmp_path / "probe.json")
    assert json.loads((tmp_path / "probe.json").read_text()) == rows
    with pytest.raises(ProbeError, match="probe.txt: the output must end in .csv or .json"):
        write_results(rows, tmp_path / "probe.txt")


def test_command_line(tmp_path, folders, tiny_ckpt, capsys):
    out = tmp_path / "probe.json"
    code = main(["eval", "probe", "--ckpt", str(tiny_ckpt), "--train", str(folders[0]), "--val", str(folders[1]),
                 "--through-projector", "--C", "0.1,1", "--backend", "python", "--batch-size", "16",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [(r["features"], r["probe"]) for r in rows] == [("projector", "prototype"), ("projector", "logistic")]
    assert rows[1]["C"] in (0.1, 1.0) and rows[0]["checkpoint"] == str(tiny_ckpt)
    assert "projector prototype top-1" in capsys.readouterr().out


def test_bad_input_names_the_path(tmp_path, folders, model, tiny_ckpt, capsys):
    rng = np.random.default_rng(0)
    train = write_folder(tmp_path / "train", rng, 2, {"a": (0, 0, 0), "b": (255, 255, 255)})
    val = write_folder(tmp_path / "val", rng, 2, {"a": (0, 0, 0), "b": (255, 255, 255)})

    (train / "empty").mkdir()
    (train / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ProbeError, match=f"{train / 'empty'}: class directory holds no image"):
        read_image_folder(train)
    (train / "empty" / "notes.txt").unlink()
    (train / "empty").rmdir()

    (val / "c").mkdir()
    (val / "c" / "0.png").write_bytes((val / "a" / "1.png").read_bytes())
    with pytest.raises(ProbeError, match=rf"hold different classes: only in {train}: \[\]; only in {val}: \['c'\]"):
        run_probes(model, train, val, progress=False)
    (val / "c" / "0.png").unlink()
    (val / "c").rmdir()

    with pytest.raises(ProbeError, match=f"{train / 'a'}: 2 image\\(s\\), fewer than --per-class 3"):
        read_image_folder(train, per_class=3)
    with pytest.raises(ProbeError, match=f"{tmp_path / 'nowhere'}: not a directory"):
        read_image_folder(tmp_path / "nowhere")

    (val / "b" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    for backend in ["python"] + ([] if dali_unavailable_reason() else ["dali"]):
        with pytest.raises(ProbeError, match=f"{val / 'b' / 'broken.jpg'}: cannot decode image"):
            run_probes(model, train, val, backend=backend, progress=False)
    code = main(["eval", "probe", "--ckpt", str(tiny_ckpt), "--train", str(train), "--val", str(val),
                 "--backend", "python", "--no-progress", "--out", str(tmp_path / "x.csv")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"pivot-mega eval probe: error: {val / 'b' / 'broken.jpg'}: cannot decode image" in err
    assert "Traceback" not in err
