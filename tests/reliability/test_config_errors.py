"""Wrong keys, paths and files are one-line errors that name them, never a traceback from deep inside."""

from __future__ import annotations

import struct

import pytest
import yaml

from pivot_mega.cli import main as cli_main
from pivot_mega.config import ConfigError
from pivot_mega.data.tokenizer import check_image_token_id, check_tokenizer_dir
from pivot_mega.models import CheckpointError, VisionLanguageModel
from pivot_mega.models.checkpoint_files import read_safetensors_dir
from pivot_mega.models.checkpoint_io import save_model
from pivot_mega.presets import model_preset_path
from pivot_mega.training.checkpoint.portable import load_model_weights
from pivot_mega.training.config import check_run_paths, load_run_config
from tests.parallel.test_equivalence import tiny_config


def _run_config(tmp_path, tokenizer: str, **train) -> dict:
    return {"stage": "sft", "model": str(model_preset_path("tiny")),
            "data": {"shards": str(tmp_path / "shards"), "tokenizer": tokenizer},
            "train": {"out_dir": str(tmp_path / "out"), **train}}


def _cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()  # what the test's setup printed (progress bars) is not the command's
    rc = cli_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


# ----------------------------------------------------------------------------------------------
# train.trainable


@pytest.mark.parametrize("value", ["vision", ["vision"]])
def test_trainable_takes_one_tower_as_a_string_or_a_list(tmp_path, tokenizer_dir, value):
    config = load_run_config(_run_config(tmp_path, str(tokenizer_dir), trainable=value))
    assert config.train.trainable == ["vision"] and config.trainable == ["vision"]


@pytest.mark.parametrize("value", [5, {"vision": True}, [5], "visio"])
def test_trainable_that_is_not_towers_names_the_key_and_the_towers(tmp_path, tokenizer_dir, value):
    with pytest.raises(ConfigError, match=r"train\.trainable: .*\['vision', 'projector', 'language'\]"):
        load_run_config(_run_config(tmp_path, str(tokenizer_dir), trainable=value))


def test_trainable_through_the_cli_is_one_line(tmp_path, tokenizer_dir, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_run_config(tmp_path, str(tokenizer_dir))))
    rc, err = _cli(["train", str(path), "--set", "train.trainable=5"], capsys)
    assert rc != 0
    assert err.strip().splitlines() == [
        f"pivot-mega train: error: {path}: train.trainable: expected a tower or a list of towers of "
        f"['vision', 'projector', 'language'], got 5"]


# ----------------------------------------------------------------------------------------------
# paths: data.tokenizer, train.out_dir


def test_a_missing_tokenizer_dir_is_named(tmp_path, tokenizer_dir):
    missing = tmp_path / "no" / "tokenizer"
    with pytest.raises(ConfigError, match=rf"^data\.tokenizer: {missing} is not a directory with a tokenizer "
                                          r"\(tokenizer\.json / tokenizer_config\.json\)$"):
        check_tokenizer_dir(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is not a directory with a tokenizer"):
        check_tokenizer_dir(tmp_path / "empty")
    check_tokenizer_dir(tokenizer_dir)
    config = load_run_config(_run_config(tmp_path, str(missing)))
    with pytest.raises(ConfigError, match=rf"^data\.tokenizer: {missing} is not a directory"):
        check_run_paths(config)
    check_run_paths(load_run_config(_run_config(tmp_path, str(tokenizer_dir))))


def test_an_out_dir_that_is_a_file_is_refused_at_load(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "out").write_text("a file, not a directory")
    with pytest.raises(ConfigError, match=rf"train\.out_dir: {tmp_path / 'out'} is a file, not a directory"):
        load_run_config(_run_config(tmp_path, str(tokenizer_dir)))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_run_config(tmp_path, str(tokenizer_dir), out_dir="elsewhere")))
    rc, err = _cli(["train", str(path), "--set", f"train.out_dir={tmp_path / 'out'}"], capsys)
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "is a file, not a directory" in err


# ----------------------------------------------------------------------------------------------
# image_token_id against the tokenizer


def test_image_token_id_must_be_a_special_token_of_the_tokenizer(tokenizer_dir, image_token):
    check_image_token_id(tokenizer_dir, image_token)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text_id = tok.convert_tokens_to_ids("a")
    with pytest.raises(ConfigError, match=rf"model\.image_token_id: {text_id} is the ordinary text token 'a' "
                                          rf"of the tokenizer {tokenizer_dir}"):
        check_image_token_id(tokenizer_dir, text_id)
    with pytest.raises(ConfigError, match=rf"model\.image_token_id: {len(tok) + 5} is not a token id of the "
                                          rf"tokenizer {tokenizer_dir} \({len(tok)} tokens\)"):
        check_image_token_id(tokenizer_dir, len(tok) + 5)


# ----------------------------------------------------------------------------------------------
# broken safetensors files


def _break(path, how: str) -> None:
    data = path.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    if how == "huge_header":
        path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    elif how == "garbage_json":
        path.write_bytes(data[:8] + b"{" * header + data[8 + header:])
    else:  # truncated
        path.write_bytes(data[:len(data) // 2])


BREAKS = ["huge_header", "garbage_json", "truncated"]


@pytest.fixture
def portable_checkpoint(tmp_path, seed):
    return save_model(VisionLanguageModel(tiny_config()).init_weights(seed), tmp_path / "ckpt")


@pytest.mark.parametrize("how", BREAKS)
def test_a_broken_safetensors_file_is_named_when_loading_init_from(portable_checkpoint, how):
    path = portable_checkpoint / "model.safetensors"
    _break(path, how)
    with pytest.raises(CheckpointError, match=rf"^{path}: not a readable safetensors file \(.+\)$"):
        read_safetensors_dir(portable_checkpoint)
    # init_from: rank 0 reads, every rank raises the same CheckpointError
    with pytest.raises(CheckpointError, match=rf"^{path}: not a readable safetensors file"):
        load_model_weights(VisionLanguageModel(tiny_config()), portable_checkpoint)


def test_a_garbled_index_is_named(portable_checkpoint):
    (portable_checkpoint / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        read_safetensors_dir(portable_checkpoint)


def test_a_broken_safetensors_file_through_train_init_from_is_one_line(tmp_path, capsys):
    from pivot_mega.config import ModelConfig, from_dict, load_yaml
    from tests.training.runs import write_tiny_run
    run = write_tiny_run(tmp_path / "run", "sft")
    model = from_dict(ModelConfig, load_yaml(run)["model"])
    ckpt = save_model(VisionLanguageModel(model).init_weights(0), tmp_path / "ckpt")
    _break(ckpt / "model.safetensors", "huge_header")
    rc, err = _cli(["train", str(run), "--set", f"init_from={ckpt}"], capsys)
    assert rc != 0
    assert f"{ckpt / 'model.safetensors'}: not a readable safetensors file (Error while deserializing header: " \
           f"header too large)" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("how", BREAKS)
def test_a_broken_safetensors_file_through_import_hf_is_one_line(tmp_path, seed, capsys, how):
    from tests.hf_models import CASES, make_llava
    llava = tmp_path / "llava"
    make_llava(CASES[0], seed).save_pretrained(llava)
    _break(llava / "model.safetensors", how)
    rc, err = _cli(["convert", "import-hf", "--llava", str(llava), "--out", str(tmp_path / "out")], capsys)
    assert rc != 0
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith(f"pivot-mega convert: error: {llava / 'model.safetensors'}: not a readable safetensors "
                          f"file (")
    assert not (tmp_path / "out" / "model.safetensors").exists()
