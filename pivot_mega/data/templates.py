"""Text templates: a shard sample → token ids and labels, images expanded to image-token runs.

``plain`` (stage 1a, LLaVA's pretraining prompt): the image tokens, then the caption and ``\\n``;
the human turn's text is dropped, labels cover the caption and the ``\\n``.

``qwen2`` (ChatML)::

    <|im_start|>system\\n{system prompt}<|im_end|>\\n
    <|im_start|>user\\n<image>\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n        ... more turns

Labels cover each assistant answer and its ``<|im_end|>``, nothing else. (LLaVA-NeXT's
``preprocess_qwen`` also trains the ``<|im_start|>assistant\\n`` header and the ``\\n`` and
``<|im_start|>`` tokens of user turns; those are not predictions the model needs to make.)

A template renders a sample as pieces (text or an image, trained or not) and each text piece is
tokenized on its own, so a DPO prompt has the same tokens in front of both responses, and the
labels follow the pieces exactly. Piece boundaries sit at special tokens or image positions, where
whole-string tokenization splits too. Each ``<image>`` becomes ``num_image_tokens`` copies of
``image_token_id`` (label -100). A single image is moved to the front of its turn (``<image>\\n``
then the text): in conversations when it is not there already (LLaVA), in DPO prompts always (PIVOT).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..batch import IGNORE_INDEX
from .sources import IMAGE_PLACEHOLDER, ROLES, DataError, image_first

TEMPLATES = ("plain", "qwen2")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of text (``text``) or one image (``text is None``); ``train``: labels on its tokens."""

    text: str | None
    train: bool = False


@dataclasses.dataclass
class Sequence:
    """One tokenized sequence: ``input_ids`` and ``labels`` int64 ``[T]``; ``num_images`` image runs."""

    input_ids: np.ndarray
    labels: np.ndarray
    num_images: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass
class Unit:
    """What packing places in a row: one sequence, or a DPO pair kept together.

    A pair is ``[chosen, rejected]`` (each with the prompt in front), or with ``shared_prefix``
    ``[prefix, chosen, rejected]``: the prompt once, then each response as a branch of it.
    """

    index: int  # sample number in the shard set
    sample_id: str
    sequences: list[Sequence]
    image_members: list[str]  # tar member extensions of the sample's images, in reading order
    truncated: bool = False
    shared_prefix: bool = False

    @property
    def length(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def is_pair(self) -> bool:
        return self.shared_prefix or len(self.sequences) == 2


def pair_unit(index: int, sample_id: str, prompt: tuple[list[int], list[int], int], chosen: tuple[list[int], list[int]],
              rejected: tuple[list[int], list[int]], image_members: list[str], *, shared_prefix: bool,
              truncated: bool = False) -> Unit:
    """A DPO pair as packing places it: ``prompt`` (ids, labels, images) and each response's (ids, labels)."""
    (p_ids, p_lab, num_images), (c_ids, c_lab), (r_ids, r_lab) = prompt, chosen, rejected
    if shared_prefix:
        sequences = [_sequence(p_ids, p_lab, num_images), _sequence(c_ids, c_lab, 0), _sequence(r_ids, r_lab, 0)]
    else:
        sequences = [_sequence(p_ids + c_ids, p_lab + c_lab, num_images),
                     _sequence(p_ids + r_ids, p_lab + r_lab, num_images)]
    return Unit(index, sample_id, sequences, image_members, truncated, shared_prefix)


@dataclasses.dataclass(frozen=True)
class LoadSkip:
    """A sample the loader leaves out (counted by reason)."""

    index: int
    sample_id: str
    reason: str
    detail: str


# ----------------------------------------------------------------------------------------------
# Rendering: sample → pieces


def _content_pieces(text: str, num_images: int, always_first: bool = False) -> list[Piece]:
    # LLaVA moves a single image to the front of a turn unless it is there already; PIVOT's DPO
    # dataset re-places it in every prompt.
    single = num_images == 1 and text.count(IMAGE_PLACEHOLDER) == 1
    if single and (always_first or not text.startswith(IMAGE_PLACEHOLDER)):
        text = image_first(text)
    pieces = []
    for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            pieces.append(Piece(None))
        if part:
            pieces.append(Piece(part))
    return pieces


def _conversation(sample: dict) -> list[tuple[str, str]]:
    """(role, text) turns with roles user / assistant / system; a pair becomes prompt + chosen."""
    if sample["type"] == "pair":
        return [("user", sample["prompt"]), ("assistant", sample["chosen"])]
    return [(ROLES[t["from"]], t["value"]) for t in sample["conversations"]]


def render_plain(sample: dict) -> list[Piece]:
    turns = _conversation(sample)
    if len(turns) != 2 or turns[0][0] != "user" or turns[1][0] != "assistant":
        raise _TemplateMismatch(f"the plain template takes one user turn and one reply, got roles "
                                f"{[role for role, _ in turns]}")
    images = [Piece(None)] * turns[0][1].count(IMAGE_PLACEHOLDER)
    return images + [Piece(turns[1][1] + "\n", train=True)]


def _chatml_turn(role: str, text: str, num_images: int, always_first: bool = False) -> list[Piece]:
    if role == "assistant":
        return [Piece(f"{IM_START}assistant\n"), Piece(text + IM_END, train=True), Piece("\n")]
    return [Piece(f"{IM_START}{role}\n"), *_content_pieces(text, num_images, always_first), Piece(f"{IM_END}\n")]


def render_qwen2(sample: dict, system_prompt: str, num_images: int) -> list[Piece]:
    turns = _conversation(sample)
    if turns[0][0] == "system":
        system_prompt, turns = turns[0][1], turns[1:]
    pieces = _chatml_turn("system", system_prompt, 0)
    for role, text in turns:
        pieces += _chatml_turn(role, text, num_images)
    return pieces


def render_pair(sample: dict, system_prompt: str, num_images: int) -> tuple[list[Piece], list[Piece], list[Piece]]:
    """(prompt, chosen, rejected) pieces of a DPO pair under qwen2; prompt ends with the
    ``<|im_start|>assistant\\n`` header, each response with ``<|im_end|>\\n``."""
    prompt = _chatml_turn("system", system_prompt, 0) + _chatml_turn("user", sample["prompt"], num_images,
                                                                      always_first=True)
    prompt.append(Piece(f"{IM_START}assistant\n"))
    return (prompt, [Piece(sample["chosen"] + IM_END, train=True), Piece("\n")],
            [Piece(sample["rejected"] + IM_END, train=True), Piece("\n")])


class _TemplateMismatch(ValueError):
    pass


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Adjacent text pieces with the same ``train`` flag joined (fewer tokenizer calls)."""
    merged: list[Piece] = []
    for piece in pieces:
        if merged and piece.text is not None and merged[-1].text is not None and merged[-1].train == piece.train:
            merged[-1] = Piece(merged[-1].text + piece.text, piece.train)
        else:
            merged.append(piece)
    return merged


# ----------------------------------------------------------------------------------------------
# Encoding: pieces → ids, labels


class TextEncoder:
    """Renders and tokenizes shard samples into Units for one data config.

    ``tokenizer``: a Hugging Face tokenizer directory. ``image_token_id`` / ``num_image_tokens``
    come from the model (the only two facts data needs of it).
    """

    def __init__(self, tokenizer: str | os.PathLike, *, template: str, mode: str, system_prompt: str,
                 image_token_id: int, num_image_tokens: int, max_seq_len: int, truncate_response: bool,
                 dpo_layout: str = "shared_prefix"):
        from transformers import AutoTokenizer

        if template not in TEMPLATES:
            raise DataError(f"unknown template {template!r}; known: {list(TEMPLATES)}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.template, self.mode, self.system_prompt = template, mode, system_prompt
        self.image_token_id, self.num_image_tokens = image_token_id, num_image_tokens
        self.max_seq_len, self.truncate_response = max_seq_len, truncate_response
        self.shared_prefix = dpo_layout == "shared_prefix"
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if pad is None:
            raise DataError(f"{tokenizer}: the tokenizer has neither a pad nor an eos token to pad rows with")
        self.pad_token_id = int(pad)
        if template == "qwen2":
            for token in (IM_START, IM_END):
                ids = self.tokenizer.encode(token, add_special_tokens=False)
                if len(ids) != 1:
                    raise DataError(f"{tokenizer}: the qwen2 template needs {token} as one special token, "
                                    f"it encodes to {ids}")

    def _render(self, sample: dict) -> list[list[Piece]]:
        num_images = len(sample["images"])
        if self.mode == "dpo":
            if sample["type"] != "pair":
                raise _TemplateMismatch("mode 'dpo' needs preference pairs, this sample is a conversation")
            prompt, chosen, rejected = render_pair(sample, self.system_prompt, num_images)
            return [_merge(prompt), _merge(chosen), _merge(rejected)]
        if self.template == "plain":
            return [_merge(render_plain(sample))]
        return [_merge(render_qwen2(sample, self.system_prompt, num_images))]

    def encode(self, samples: list[tuple[int, dict]]) -> list[Unit | LoadSkip]:
        """Units (or LoadSkips) for ``[(sample number, sidecar)]``, in the same order."""
        rendered, texts = [], {}
        for index, sample in samples:
            try:
                parts = self._render(sample)
            except _TemplateMismatch as e:
                rendered.append(LoadSkip(index, sample["id"], "template_mismatch", str(e)))
                continue
            rendered.append(parts)
            for part in parts:
                for piece in part:
                    if piece.text is not None:
                        texts.setdefault(piece.text, None)
        if texts:
            encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            texts = dict(zip(texts, encoded))
        units = []
        for (index, sample), parts in zip(samples, rendered):
            if isinstance(parts, LoadSkip):
                units.append(parts)
                continue
            ids = [self._tokens(part, texts) for part in parts]
            units.append(self._unit(index, sample, ids))
        return units

    def _tokens(self, pieces: list[Piece], texts: dict) -> tuple[list[int], list[int], int]:
        input_ids, labels, images = [], [], 0
        for piece in pieces:
            if piece.text is None:
                input_ids += [self.image_token_id] * self.num_image_tokens
                labels += [IGNORE_INDEX] * self.num_image_tokens
                images += 1
            else:
                ids = texts[piece.text]
                input_ids += ids
                labels += ids if piece.train else [IGNORE_INDEX] * len(ids)
        return input_ids, labels, images

    def _unit(self, index: int, sample: dict, parts: list[tuple[list[int], list[int], int]]) -> Unit | LoadSkip:
        def skip(reason, detail):
            return LoadSkip(index, sample["id"], reason, detail)

        text_ids = [i for ids, _, _ in parts for i in ids]
        expected_image_tokens = sum(n for _, _, n in parts) * self.num_image_tokens
        if sum(1 for i in text_ids if i == self.image_token_id) != expected_image_tokens:
            return skip("image_token_in_text", f"the text itself encodes to image token id {self.image_token_id}")
        if len(parts) == 3:  # DPO: the prompt in front of both responses, or once before both
            (p_ids, p_lab, p_img), (c_ids, c_lab, _), (r_ids, r_lab, _) = parts
            return self._fit_pair(index, sample, (p_ids, p_lab, p_img), (c_ids, c_lab), (r_ids, r_lab), skip)
        ids, labels, num_images = parts[0]
        truncated = False
        if len(ids) > self.max_seq_len:
            last_image = max((i for i, t in enumerate(ids) if t == self.image_token_id), default=-1)
            keeps_label = any(lab != IGNORE_INDEX for lab in labels[:self.max_seq_len])
            if not self.truncate_response or last_image >= self.max_seq_len or not keeps_label:
                why = "" if self.truncate_response else " (data.truncate_response: false)"
                return skip("too_long", f"{len(ids)} tokens > max_seq_len {self.max_seq_len}{why}")
            ids, labels, truncated = ids[:self.max_seq_len], labels[:self.max_seq_len], True
        if all(lab == IGNORE_INDEX for lab in labels):
            return skip("no_labels", "no assistant tokens to train on")
        return Unit(index, sample["id"], [_sequence(ids, labels, num_images)], sample["images"], truncated)

    def _fit_pair(self, index, sample, prompt, chosen, rejected, skip) -> Unit | LoadSkip:
        (p_ids, p_lab, num_images), (c_ids, c_lab), (r_ids, r_lab) = prompt, chosen, rejected
        prompts = 1 if self.shared_prefix else 2  # how often the row holds the prompt
        budget = self.max_seq_len - prompts * len(p_ids)
        total = prompts * len(p_ids) + len(c_ids) + len(r_ids)
        truncated = False
        if total > self.max_seq_len:
            if not self.truncate_response or budget < 2:
                why = "" if self.truncate_response else " (data.truncate_response: false)"
                layout = "the prompt once" if self.shared_prefix else "their prompt"
                return skip("too_long", f"chosen + rejected with {layout} are {total} tokens > "
                                        f"max_seq_len {self.max_seq_len}{why}")
            # Cut the longer response first: keep = the largest k with min(c, k) + min(r, k) <= budget.
            short, long_ = sorted((len(c_ids), len(r_ids)))
            keep = budget - short if short <= budget // 2 else budget // 2
            c_ids, c_lab, r_ids, r_lab = c_ids[:keep], c_lab[:keep], r_ids[:keep], r_lab[:keep]
            truncated = True
        return pair_unit(index, sample["id"], (p_ids, p_lab, num_images), (c_ids, c_lab), (r_ids, r_lab),
                         sample["images"], shared_prefix=self.shared_prefix, truncated=truncated)


def _sequence(ids: list[int], labels: list[int], num_images: int) -> Sequence:
    return Sequence(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), num_images)
