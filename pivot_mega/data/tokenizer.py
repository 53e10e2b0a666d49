"""Tokenizer directories: the files that make one, and a small byte-level BPE trained on your own texts.

    train_tokenizer("runs/demo/tokenizer", captions + questions + answers, vocab_size=400)
    AutoTokenizer.from_pretrained("runs/demo/tokenizer")      # what data.tokenizer names
    copy_tokenizer_files("runs/demo/tokenizer", "runs/demo/out/final")

``TOKENIZER_FILES`` are the files of an HF tokenizer directory; every model directory written from
one (a run's ``final/``, HF exports, imports, transplants) gets a copy of those it has, so that it
loads on its own.

The trained tokenizer is for runs with no model hub to download one from (the demo, the tests). The
special tokens are Qwen2's names (``<|im_start|>``, ``<|im_end|>`` for the ChatML template,
``<|image_pad|>`` for image positions), given the first ids in the order of ``special_tokens``; the
real Qwen2.5 tokenizer is the one to use for a real run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..config import ConfigError

# What transformers' save_pretrained writes for a tokenizer (fast and slow vocabularies, legacy maps),
# and the chat template in both spellings: chat_template.jinja (transformers >= 4.47) and the older
# chat_template.json that processors write.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
# Either of these makes a directory one that AutoTokenizer can load without a model hub.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")
# Named chat templates besides the default one, one NAME.jinja each.
CHAT_TEMPLATES_DIR = "additional_chat_templates"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<image>")
# Qwen2's chat template, reduced to messages (the layout of the qwen2 data template).
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}")


def train_tokenizer(directory: str | os.PathLike, corpus: Iterable[str], vocab_size: int = 400, *,
                    special_tokens: Sequence[str] = SPECIAL_TOKENS, eos_token: str = "<|im_end|>",
                    pad_token: str = "<|endoftext|>", chat_template: str = CHAT_TEMPLATE) -> Path:
    """Trains a byte-level BPE of at most ``vocab_size`` tokens (special tokens and the 256 byte
    symbols included) on ``corpus`` and saves it to ``directory`` (``tokenizer.json``,
    ``tokenizer_config.json``, the chat template). Deterministic: the same corpus gives the same
    files. → ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens)
    for token in (eos_token, pad_token):
        if token not in special_tokens:
            raise ValueError(f"{token!r} must be one of the special tokens {special_tokens}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(special_tokens) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is below the {len(special_tokens)} special tokens + "
                         f"{len(alphabet)} byte symbols a byte-level BPE needs")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token)
    hf.chat_template = chat_template
    directory = Path(directory)
    hf.save_pretrained(directory)
    return directory


def copy_tokenizer_files(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Copies the tokenizer files that ``source`` has (``TOKENIZER_FILES``, ``CHAT_TEMPLATES_DIR/*.jinja``)
    into the existing directory ``target``. → the copied paths, relative to ``target``."""
    source, target = Path(source), Path(target)
    names = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    names += sorted(str(path.relative_to(source)) for path in (source / CHAT_TEMPLATES_DIR).glob("*.jinja"))
    for name in names:
        (target / name).parent.mkdir(exist_ok=True)
        shutil.copy2(source / name, target / name)
    return names


def special_token_id(directory: str | os.PathLike, token: str = "<|image_pad|>") -> int:
    """The id of a special (added) token of a saved tokenizer, read from its ``tokenizer.json``."""
    import json

    path = Path(directory) / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for added in data.get("added_tokens", []):
        if added["content"] == token:
            return int(added["id"])
    raise KeyError(f"{path}: no added token {token!r}")


def check_tokenizer_dir(directory: str | os.PathLike, key: str = "data.tokenizer") -> None:
    """Raises ConfigError unless ``directory`` holds a tokenizer. Checked before transformers sees the
    path: it would take a missing directory for a model-hub repo id and fail with a confusing message."""
    path = Path(directory)
    if not any((path / name).is_file() for name in TOKENIZER_MARKERS):
        raise ConfigError(f"{key}: {directory} is not a directory with a tokenizer ({' / '.join(TOKENIZER_MARKERS)})")


def check_image_token_id(directory: str | os.PathLike, image_token_id: int, key: str = "model.image_token_id") -> None:
    """Raises ConfigError unless ``image_token_id`` is a special (added) token of the tokenizer in
    ``directory``: an ordinary text token would turn every occurrence of that text into an image slot."""
    from transformers import AutoTokenizer

    check_tokenizer_dir(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if not 0 <= image_token_id < len(tokenizer):
        raise ConfigError(f"{key}: {image_token_id} is not a token id of the tokenizer {directory} "
                          f"({len(tokenizer)} tokens)")
    if image_token_id not in tokenizer.added_tokens_decoder:
        token = tokenizer.convert_ids_to_tokens(image_token_id)
        raise ConfigError(f"{key}: {image_token_id} is the ordinary text token {token!r} of the tokenizer "
                          f"{directory}, not a special token; give the id of its image token (e.g. "
                          f"<|image_pad|>)")
