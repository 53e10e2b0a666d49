"""train.wandb: MetricsLogger's W&B sink, read back from the offline run files (no network)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from pivot_mega.config import ConfigError
from pivot_mega.training.config import TrainConfig, WandbConfig, import_wandb, load_run_config
from pivot_mega.training.metrics import MetricsLogger, probe_records, read_metrics, scalars, step_records

RUN_CONFIG = {"stage": "sft", "train": {"out_dir": "runs/x", "global_batch_size": 8}, "optim": {"lr": 1e-5}}


# wandb is the optional extra pivot-mega[wandb]; the test extra that `make setup` installs holds it.
NO_WANDB = "wandb is not installed (pip install 'pivot-mega[wandb]')"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb imported, every W&B path under tmp_path, offline and quiet whatever the config says."""
    pytest.importorskip("wandb", reason=NO_WANDB)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_ERROR_REPORTING": "false", "WANDB__DISABLE_STATS": "true",
                        "WANDB__DISABLE_MACHINE_INFO": "true"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return WandbConfig(mode="offline", project="pivot-test", name="tiny", dir=str(tmp_path / "wb"))


def _logger(out_dir, wandb, *, start_step=0, run_id=None, enabled=True) -> MetricsLogger:
    return MetricsLogger(out_dir, enabled=enabled, total_steps=10, start_step=start_step, progress=False,
                         tensorboard=False, log_every=2, stage="sft", num_devices=1, peak_tflops=None,
                         wandb=wandb, run_config=RUN_CONFIG, wandb_run_id=run_id)


def _run_steps(logger: MetricsLogger, steps, probe_at: int | None = None) -> None:
    for step in steps:
        logger.add_step(tokens=100, flops=1e9, data_wait_s=0.0)
        logger.log(step, {"loss": 1.0 / step, "grad_norm": 0.5 + step, "lr": 1e-5 * step, "tokens": 100,
                          "samples": 8, "rewards/accuracies": 0.25 * step, "rewards/margins": 0.1 * step})
        if step == probe_at:
            logger.log_probe(step, {"probe/pooled/logreg/top1": 62.5, "probe/time_s": 0.25})
    logger.close()


def _wandb_records(path: Path) -> list:
    """The records of a ``run-*.wandb`` file. Its framing is LevelDB's log format (after a 7-byte header:
    ``:W&B``, magic 0xBEE1, version 0): 32 KiB blocks of chunks ``crc32 u32, length u16, type u8`` (1 full,
    2 first, 3 middle, 4 last). wandb 0.31 reads it only in its Go core, so the framing is undone here and
    the records parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), path
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:  # zero padding
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _read_run(run_dir: Path) -> tuple[str, dict, dict[int, dict]]:
    """(run id, config, {step: logged values}) of an offline run directory."""
    (path,) = run_dir.glob("run-*.wandb")
    run_id, config, history = None, {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run_id, config, history


def _offline_runs(wandb_dir: Path) -> list[Path]:
    import wandb

    wandb.teardown()  # run.finish() returns before W&B's service has written out the run file
    return sorted(p for p in (wandb_dir / "wandb").glob("offline-run-*") if p.is_dir())


def test_offline_run_has_the_metrics_and_the_config(tmp_path, offline):
    logger = _logger(tmp_path / "out", offline)
    run_id = logger.wandb_run_id
    assert run_id
    _run_steps(logger, [1, 2, 3], probe_at=2)
    assert logger.wandb_run_id is None  # closed

    (run_dir,) = _offline_runs(Path(offline.dir))
    logged_id, config, history = _read_run(run_dir)
    assert logged_id == run_id
    for key, value in RUN_CONFIG.items():
        assert config[key] == value
    records = read_metrics(tmp_path / "out")
    expected = {record["step"]: scalars(record) for record in step_records(records)}
    for record in probe_records(records):  # its results join its step's row (its time, as in TensorBoard, not)
        expected[record["step"]].update({k: v for k, v in scalars(record).items() if k != "time"})
    assert sorted(history) == [1, 2, 3]
    assert "perf/tokens_per_s_per_device" in history[2] and "perf/mfu" not in history[2]  # None: not a scalar
    assert history[2]["probe/pooled/logreg/top1"] == 62.5
    for step, values in expected.items():
        assert history[step] == pytest.approx(values), step


def test_resumed_logger_continues_the_same_run(tmp_path, offline):
    first = _logger(tmp_path / "out", offline)
    run_id = first.wandb_run_id
    _run_steps(first, [1, 2])

    second = _logger(tmp_path / "out", offline, start_step=2, run_id=run_id)
    assert second.wandb_run_id == run_id
    _run_steps(second, [3, 4])

    runs = _offline_runs(Path(offline.dir))
    assert len(runs) == 2  # offline: one directory per process, both of the run id (``wandb sync`` joins them)
    read = [_read_run(run_dir) for run_dir in runs]
    assert {run_id for run_id, _, _ in read} == {run_id}
    assert sorted(step for _, _, history in read for step in history) == [1, 2, 3, 4]


def test_wandb_dir_defaults_to_out_dir(tmp_path, offline):
    offline.dir = ""
    _run_steps(_logger(tmp_path / "out", offline), [1])
    assert len(_offline_runs(tmp_path / "out")) == 1


@pytest.mark.parametrize("wandb", [None, WandbConfig(), WandbConfig(mode="offline")])
def test_disabled_or_not_rank0_logs_nothing(tmp_path, monkeypatch, wandb):
    def refuse(*args, **kwargs):
        raise AssertionError("wandb.init called")

    wandb_module = pytest.importorskip("wandb", reason=NO_WANDB)
    monkeypatch.setattr(wandb_module, "init", refuse)
    enabled = wandb is None or wandb.mode == "disabled"  # rank 0 unless W&B is on: then another rank
    logger = _logger(tmp_path / "out", wandb, enabled=enabled)
    assert logger.wandb_run_id is None
    _run_steps(logger, [1, 2])
    assert not list(tmp_path.rglob("wandb"))
    assert WandbConfig().mode == "disabled" and not TrainConfig().wandb.enabled


def test_missing_wandb_is_one_line_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'pivot-mega\[wandb\]'") as error:
        _logger(tmp_path / "out", WandbConfig(mode="offline"))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"pip install 'pivot-mega\[wandb\]'"):
        import_wandb()
    _run_steps(_logger(tmp_path / "out", WandbConfig()), [1])  # disabled: wandb never imported


def test_mode_is_validated(tmp_path):
    base = {"stage": "sft", "init_from": str(tmp_path / "ckpt"), "train": {"out_dir": str(tmp_path / "out")},
            "data": {"shards": str(tmp_path / "shards"), "tokenizer": str(tmp_path / "tokenizer")}}
    config = load_run_config(base, ["train.wandb.mode=offline", "train.wandb.project=p", "train.wandb.entity=e"])
    assert config.train.wandb == WandbConfig(mode="offline", project="p", entity="e")
    assert config.to_dict()["train"]["wandb"]["mode"] == "offline"
    with pytest.raises(ConfigError, match=r"train.wandb.mode: 'bogus' is not one of \['online', 'offline', "):
        load_run_config(base, ["train.wandb.mode=bogus"])
    with pytest.raises(ConfigError, match=r"^train.wandb.mode: 'off' is not one of") as error:
        TrainConfig(wandb=WandbConfig(mode="off")).validate()
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"train.wandb: unknown key\(s\) \['projekt'\]"):
        load_run_config(base, ["train.wandb.projekt=p"])


def test_a_resumed_training_run_continues_its_wandb_run(tmp_path, offline):
    """Through the trainer: the run id goes into every checkpoint and the resumed run logs to it."""
    from tests.training.runs import write_tiny_run
    from tests.training.test_trainer import train

    config = write_tiny_run(tmp_path / "run", "sft", ["train.max_steps=2", "train.save_every=1",
                                                      "train.wandb.mode=offline"], samples=16)
    train(config)
    train(config, "train.max_steps=4")
    out = tmp_path / "run" / "out"
    saved = {json.loads(f.read_text()).get("wandb_run_id")
             for f in out.glob("checkpoints/step_*/rank_state/rank_00000.json")}
    runs = [_read_run(r) for r in _offline_runs(out)]
    assert len(runs) == 2 and len(saved) == 1 and None not in saved
    assert {run_id for run_id, _, _ in runs} == saved
    assert sorted(step for _, _, history in runs for step in history) == [1, 2, 3, 4]
