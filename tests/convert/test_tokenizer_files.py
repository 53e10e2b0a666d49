"""Every model directory written from a tokenizer directory keeps all of that directory's tokenizer files:
a run's ``final/`` and ``hf/llava``, ``convert export-hf``, ``convert import-hf``, ``transplant``."""

import json
import shutil
from pathlib import Path

import pytest

from pivot_mega.cli import main
from pivot_mega.config import load_model_config
from pivot_mega.data.tokenizer import CHAT_TEMPLATE, special_token_id
from pivot_mega.models import VisionLanguageModel, save_model
from pivot_mega.presets import model_preset_path
from pivot_mega.training.config import load_run_config
from pivot_mega.training.trainer import Trainer
from tests.data.helpers import make_tokenizer
from tests.hf_models import CASES, make_qwen2, make_siglip
from tests.training.runs import write_tiny_run

# What an HF tokenizer directory can hold, listed here rather than read from the code under test.
SOURCE_FILES = sorted([
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",       # what make_tokenizer saves
    "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "chat_template.json", "additional_chat_templates/tool_use.jinja",
])
# The LLaVA export renames the image token in these two (see convert.hf._make_processor).
REWRITTEN_BY_LLAVA_EXPORT = ("tokenizer.json", "tokenizer_config.json")


def write_full_tokenizer(directory: Path) -> Path:
    """make_tokenizer's directory plus every other file a tokenizer directory can hold, each real
    enough for AutoTokenizer to load the directory as before."""
    make_tokenizer(directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    (directory / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                   "pad_token": "<|endoftext|>"}))
    (directory / "added_tokens.json").write_text(json.dumps({t["content"]: t["id"] for t in data["added_tokens"]}))
    (directory / "tokenizer.model").write_bytes(b"a SentencePiece model, unread here")
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (directory / "additional_chat_templates").mkdir()
    (directory / "additional_chat_templates" / "tool_use.jinja").write_text(CHAT_TEMPLATE)
    assert _files(directory) == SOURCE_FILES
    return directory


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def assert_keeps_tokenizer(source: Path, target: Path, rewritten=()) -> None:
    """Every file of the tokenizer directory ``source`` is in ``target``, byte for byte unless ``rewritten``."""
    missing = [name for name in _files(source) if not (target / name).is_file()]
    assert not missing, f"{target} lost tokenizer files {missing}"
    changed = [name for name in _files(source)
               if name not in rewritten and (target / name).read_bytes() != (source / name).read_bytes()]
    assert not changed, f"{target}: tokenizer files {changed} differ from {source}'s"


def assert_no_tokenizer(target: Path) -> None:
    """The SigLIP export is the vision encoder alone: the language model's tokenizer has no place there."""
    assert not set(_files(target)) & set(SOURCE_FILES)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return write_full_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tok")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer) -> Path:
    """A tiny pivot_mega checkpoint with the tokenizer's files beside it (as a run's final/ has them)."""
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    # <image>: the token that transplant finds first in tokenizer.json and checks against the config.
    config = load_model_config(model_preset_path("tiny"), [f"image_token_id={special_token_id(tokenizer, '<image>')}"])
    save_model(VisionLanguageModel(config).init_weights(0), path)
    shutil.copytree(tokenizer, path, dirs_exist_ok=True)
    return path


def test_a_trained_model_and_its_hf_exports_keep_every_tokenizer_file(tmp_path, tokenizer):
    shutil.copytree(tokenizer, tmp_path / "tokenizer")  # write_tiny_run trains none when one is there
    config = write_tiny_run(tmp_path, "pretrain_projector", ["train.max_steps=1", "train.export_hf=true"])
    Trainer(load_run_config(config)).run()
    out = tmp_path / "out"
    assert_keeps_tokenizer(tokenizer, out / "final")
    assert_keeps_tokenizer(tokenizer, out / "hf" / "llava", rewritten=REWRITTEN_BY_LLAVA_EXPORT)
    assert_no_tokenizer(out / "hf" / "siglip")


def test_export_hf_keeps_every_tokenizer_file(tmp_path, tokenizer, ckpt):
    for fmt in ("llava", "siglip"):
        assert main(["convert", "export-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / fmt), "--format", fmt]) == 0
    assert_keeps_tokenizer(tokenizer, tmp_path / "llava", rewritten=REWRITTEN_BY_LLAVA_EXPORT)
    assert_no_tokenizer(tmp_path / "siglip")


def test_transplant_keeps_every_tokenizer_file_of_the_llm(tmp_path, tokenizer, ckpt):
    assert main(["transplant", "--vision-from", str(ckpt), "--llm", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    assert_keeps_tokenizer(tokenizer, tmp_path / "out")


def test_import_hf_keeps_every_tokenizer_file_of_the_llm(tmp_path, tokenizer):
    case = CASES[0]
    make_siglip(case, seed=0).save_pretrained(tmp_path / "siglip")
    make_qwen2(case, seed=0).save_pretrained(tmp_path / "qwen")
    shutil.copytree(tokenizer, tmp_path / "qwen", dirs_exist_ok=True)
    assert main(["convert", "import-hf", "--vision", str(tmp_path / "siglip"), "--llm", str(tmp_path / "qwen"),
                 "--out", str(tmp_path / "ckpt")]) == 0
    assert_keeps_tokenizer(tokenizer, tmp_path / "ckpt")
