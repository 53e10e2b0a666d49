"""A crafted DCP ``.metadata`` is refused by name before it can run code, on resume and on init_from."""

from __future__ import annotations

import pathlib
import pickle

import pytest
import torch

from pivot_mega.models import CheckpointError
from pivot_mega.training import load_checkpoint, save_checkpoint
from pivot_mega.training.config import load_run_config
from pivot_mega.training.trainer import Trainer
from tests.parallel.test_equivalence import tiny_config
from tests.training.runs import write_tiny_run
from tests.training.test_checkpoint import _model_and_optimizer


class _TouchOnLoad:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with ``os.system``."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _plant(checkpoint: pathlib.Path, marker: pathlib.Path) -> None:
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_TouchOnLoad(marker)))


REFUSED = r"step_000001/\.metadata: refusing to unpickle pathlib\.\w*Path\.touch"


def test_a_crafted_metadata_is_refused_on_resume(tmp_path, seed):
    model, optimizer = _model_and_optimizer(tiny_config(), seed)
    path = save_checkpoint(tmp_path, step=1, pmodel=model, optimizer=optimizer).wait()
    marker = tmp_path / "pwned"
    _plant(path, marker)
    with pytest.raises(CheckpointError, match=REFUSED) as error:
        load_checkpoint(path, pmodel=model, optimizer=optimizer)
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_a_crafted_metadata_is_refused_on_init_from(tmp_path):
    config = write_tiny_run(tmp_path / "first", "sft", ["train.max_steps=1"])
    summary = Trainer(load_run_config(config)).run()
    path = tmp_path / "first" / "out" / "checkpoints" / "step_000001"
    assert path.is_dir(), summary
    marker = tmp_path / "pwned"
    _plant(path, marker)
    second = write_tiny_run(tmp_path / "second", "sft", ["train.max_steps=1"])
    with pytest.raises(CheckpointError, match=REFUSED) as error:
        Trainer(load_run_config(second, [f"init_from={path}"])).run()
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_a_genuine_checkpoint_still_loads_exactly(tmp_path, seed):
    model, optimizer = _model_and_optimizer(tiny_config(), seed)
    path = save_checkpoint(tmp_path, step=1, pmodel=model, optimizer=optimizer).wait()
    fresh, fresh_optimizer = _model_and_optimizer(tiny_config(), seed + 1)
    loaded = load_checkpoint(path, pmodel=fresh, optimizer=fresh_optimizer)
    assert loaded.step == 1
    for (name, want), got in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(got, want), name
