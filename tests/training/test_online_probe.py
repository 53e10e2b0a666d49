"""Encoder probes while a run trains (``eval.probe``): logged at step 0, every N steps and at the end,
the training itself unchanged by them, the same numbers after a resume and on every parallel layout."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from PIL import Image

from pivot_mega.training.steps import StepRunner
from tests.distributed import require_procs, run_workers
from tests.training.runs import COLOURS, write_tiny_run
from tests.training.test_trainer import _layout_worker, metrics, train

PROBE_KEYS = {f"probe/{features}/{probe}/{k}" for features in ("vit", "projector")
              for probe in ("prototype", "logistic") for k in ("top1", "top5")} | {"probe/time_s"}


def write_probe_folders(root, seed: int, per_class: int = 6) -> dict[str, str]:
    """ImageFolder train / val splits whose classes are the colours (plus noise)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for name, colour in list(COLOURS.items())[:3]:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(np.array(colour)[None, None] + rng.integers(-60, 61, (40, 40, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return {"train": str(root / "train"), "val": str(root / "val")}


def probe_overrides(folders: dict, every: int) -> list[str]:
    return [f"eval.probe.train={folders['train']}", f"eval.probe.val={folders['val']}", f"eval.probe.every={every}"]


def split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    steps = [r for r in records if "loss" in r]
    probes = [r for r in records if "probe/time_s" in r]
    return steps, probes


def probe_values(probes: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k.startswith("probe/") and k != "probe/time_s"} for r in probes]


@pytest.fixture(scope="module")
def run(tmp_path_factory, seed=0):
    tmp = tmp_path_factory.mktemp("online_probe")
    config = write_tiny_run(tmp, "sft", ["train.max_steps=5", "train.save_every=0"], seed=seed)
    folders = write_probe_folders(tmp / "probe", seed)
    train(config, f"train.out_dir={tmp / 'plain'}")
    train(config, f"train.out_dir={tmp / 'probed'}", *probe_overrides(folders, 2))
    return config, folders, tmp


def test_probes_are_logged_at_the_start_every_n_steps_and_at_the_end(run):
    _, _, tmp = run
    steps, probes = split(metrics(tmp / "probed"))
    assert [r["step"] for r in probes] == [0, 2, 4, 5]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    for record in probes:
        assert set(k for k in record if k.startswith("probe/")) == PROBE_KEYS
        assert all(0 <= record[k] <= 100 for k in PROBE_KEYS - {"probe/time_s"})
    # The colours are in the pixels: a probe of any encoder reads them well above chance (33 %).
    assert probes[0]["probe/vit/logistic/top1"] >= 60, probes[0]


def test_probes_leave_the_training_unchanged(run):
    _, _, tmp = run
    plain, _ = split(metrics(tmp / "plain"))
    probed, _ = split(metrics(tmp / "probed"))
    for key in ("loss", "grad_norm", "tokens", "samples"):
        assert [r[key] for r in plain] == [r[key] for r in probed], key  # bit for bit


def test_a_resumed_run_gives_the_same_probe_numbers_at_the_same_steps(run, monkeypatch):
    config, folders, tmp = run
    out = tmp / "resumed"
    original, calls = StepRunner.run, {"n": 0}

    def stop_at_step_3(self, batches):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the step finishes, is saved, the run stops
        return original(self, batches)
    monkeypatch.setattr(StepRunner, "run", stop_at_step_3)
    summary = train(config, f"train.out_dir={out}", *probe_overrides(folders, 2))
    assert summary.stopped_by == "SIGTERM" and summary.steps == 3
    monkeypatch.undo()
    train(config, f"train.out_dir={out}", *probe_overrides(folders, 2))
    straight_steps, straight_probes = split(metrics(tmp / "probed"))
    resumed_steps, resumed_probes = split(metrics(out))
    assert [r["step"] for r in resumed_probes] == [0, 2, 4, 5]
    assert probe_values(resumed_probes) == probe_values(straight_probes)
    assert [r["loss"] for r in resumed_steps] == [r["loss"] for r in straight_steps]


@require_procs(2)
@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp2", "tp2", "pp2"])
def test_probes_on_a_parallel_layout_equal_the_single_process_ones(run, layout):
    from tests.training.test_trainer import LAYOUTS

    config, folders, tmp = run
    out = tmp / f"probed_{layout}"
    overrides = [*LAYOUTS[layout], "train.max_steps=2", *probe_overrides(folders, 2)]
    single = tmp / "probed_single_2"
    if not single.exists():
        train(config, f"train.out_dir={single}", "train.max_steps=2", *probe_overrides(folders, 2))
    assert run_workers(_layout_worker, 2, config, out, overrides, timeout=400) == [2, 2]
    _, one = split(metrics(single))
    _, two = split(metrics(out))
    assert [r["step"] for r in two] == [0, 2]
    one_image = 100 / 18  # the probe's figures are %: a difference of one image of 18 at most
    for a, b in zip(probe_values(one), probe_values(two)):
        assert a.keys() == b.keys()
        assert all(abs(a[k] - b[k]) <= one_image + 1e-6 for k in a), (layout, a, b)


def test_a_probe_leaves_every_random_stream_where_it_was(tmp_path, monkeypatch):
    """Whatever the probe code draws (here: a draw from each global stream, planted), the training's
    torch, numpy and python random states are those from before the probe."""
    import random

    import torch

    from pivot_mega.eval import probe as probe_module
    from pivot_mega.eval.config import OnlineProbeConfig
    from pivot_mega.models import VisionLanguageModel
    from pivot_mega.training.online_probe import OnlineProbe
    from tests.parallel.test_equivalence import tiny_config

    folders = write_probe_folders(tmp_path, seed=1, per_class=3)
    real = probe_module.run_probes

    def drawing(*args, **kwargs):
        torch.rand(3), np.random.rand(3), random.random()
        return real(*args, **kwargs)
    monkeypatch.setattr(probe_module, "run_probes", drawing)
    model = VisionLanguageModel(tiny_config()).init_weights(0)
    probe = OnlineProbe(OnlineProbeConfig(every=1, **folders), model.config, total_steps=1, seed=0,
                        device=torch.device("cpu"), is_main=True)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    results = probe.run(model, 0)
    assert set(results) == PROBE_KEYS
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
