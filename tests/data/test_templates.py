"""Templates: token/label layout of plain, qwen2 (against the tokenizer's chat template) and DPO pairs."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from pivot_mega.data.templates import IGNORE_INDEX, LoadSkip, TextEncoder
from tests.data.helpers import sentence

N_IMG = 5  # image tokens per image in these tests
SYSTEM = "You answer briefly."


def _encoder(tokenizer_dir, image_token, **overrides):
    # The pair tests below read whole chosen / rejected sequences: the separate layout, unless they ask.
    args = dict(template="qwen2", mode="lm", system_prompt=SYSTEM, image_token_id=image_token,
                num_image_tokens=N_IMG, max_seq_len=4096, truncate_response=False, dpo_layout="separate")
    args.update(overrides)
    return TextEncoder(tokenizer_dir, **args)


def _conversation(rng, num_images):
    turns, placed = [], 0
    for t in range(int(rng.integers(1, 4))):
        question = sentence(rng) + "?"
        if placed < num_images and (t == 0 or rng.random() < 0.5):
            # The placeholder at the front, at the end, or in the middle of the question.
            words = question.split()
            at = int(rng.integers(0, len(words) + 1))
            question = " ".join(words[:at] + ["<image>"] + words[at:])
            placed += 1
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": sentence(rng, 1, 15)}]
    while placed < num_images:
        turns[0]["value"] += " <image>"
        placed += 1
    return {"id": "x", "type": "conversation", "conversations": turns, "images": ["jpg"] * num_images}


def _reference(tokenizer, image_token, sample, system):
    """Qwen2 ChatML as one string through the tokenizer's chat template; labels from character spans."""
    single = len(sample["images"]) == 1
    messages = [{"role": "system", "content": system}]
    for turn in sample["conversations"]:
        role = "user" if turn["from"] == "human" else "assistant"
        content = turn["value"]
        if single and "<image>" in content and not content.startswith("<image>"):  # LLaVA's rule
            content = "<image>\n" + content.replace("<image>", "").strip()
        messages.append({"role": role, "content": content})
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    trained, pos = [], 0
    for m in messages:  # assistant content + <|im_end|> is trained
        start = text.index(m["content"] + "<|im_end|>", pos)
        pos = start + len(m["content"])
        if m["role"] == "assistant":
            trained.append((start, pos + len("<|im_end|>")))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids, labels = [], []
    for token, (begin, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        if token == image_id:
            ids += [image_token] * N_IMG
            labels += [IGNORE_INDEX] * N_IMG
        else:
            ids.append(token)
            labels.append(token if any(a <= begin < b for a, b in trained) else IGNORE_INDEX)
    return ids, labels


def test_qwen2_matches_the_chat_template(tokenizer_dir, image_token, seed):
    rng = np.random.default_rng(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoder = _encoder(tokenizer_dir, image_token)
    samples = [_conversation(rng, int(rng.integers(0, 3))) for _ in range(20)]
    units = encoder.encode(list(enumerate(samples)))
    for unit, sample in zip(units, samples):
        ids, labels = _reference(tokenizer, image_token, sample, SYSTEM)
        (sequence,) = unit.sequences
        assert sequence.input_ids.tolist() == ids
        assert sequence.labels.tolist() == labels
        assert sequence.num_images == len(sample["images"])
    # A system turn in the data replaces the configured system prompt.
    sample = _conversation(rng, 1)
    sample["conversations"].insert(0, {"from": "system", "value": "Be exact."})
    (unit,) = encoder.encode([(0, sample)])
    sample["conversations"].pop(0)
    assert unit.sequences[0].input_ids.tolist() == _reference(tokenizer, image_token, sample, "Be exact.")[0]


def test_plain_is_images_then_caption(tokenizer_dir, image_token, seed):
    rng = np.random.default_rng(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoder = _encoder(tokenizer_dir, image_token, template="plain")
    caption = sentence(rng, 3, 20)
    sample = {"id": "c", "type": "conversation", "images": ["jpg"],
              "conversations": [{"from": "human", "value": "<image>\nDescribe it briefly."},
                                {"from": "gpt", "value": caption}]}
    (unit,) = encoder.encode([(0, sample)])
    caption_ids = tokenizer(caption + "\n", add_special_tokens=False)["input_ids"]
    assert unit.sequences[0].input_ids.tolist() == [image_token] * N_IMG + caption_ids
    assert unit.sequences[0].labels.tolist() == [IGNORE_INDEX] * N_IMG + caption_ids
    # Multi-turn conversations are not captions.
    sample["conversations"] += [{"from": "human", "value": "more?"}, {"from": "gpt", "value": "no"}]
    (skip,) = encoder.encode([(3, sample)])
    assert isinstance(skip, LoadSkip) and skip.reason == "template_mismatch" and skip.index == 3


def _pair(rng):
    chosen, rejected = sentence(rng, 2, 15), sentence(rng, 2, 15)
    return {"id": "p", "type": "pair", "prompt": sentence(rng) + "? <image>", "chosen": chosen,
            "rejected": rejected, "images": ["jpg"]}


def test_dpo_pair_shares_its_prompt_tokens(tokenizer_dir, image_token, seed):
    rng = np.random.default_rng(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoder = _encoder(tokenizer_dir, image_token, mode="dpo")
    samples = [_pair(rng) for _ in range(10)]
    for unit, sample in zip(encoder.encode(list(enumerate(samples))), samples):
        chosen, rejected = unit.sequences
        for seq, text in ((chosen, sample["chosen"]), (rejected, sample["rejected"])):
            conv = {"type": "conversation", "images": ["jpg"],
                    "conversations": [{"from": "human", "value": sample["prompt"]}, {"from": "gpt", "value": text}]}
            ids, labels = _reference(tokenizer, image_token, conv, SYSTEM)
            assert seq.input_ids.tolist() == ids and seq.labels.tolist() == labels
        response = len(tokenizer(sample["chosen"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
        prompt = len(chosen) - response
        assert chosen.input_ids[:prompt].tolist() == rejected.input_ids[:prompt].tolist()
        assert (chosen.labels[:prompt] == IGNORE_INDEX).all() and (rejected.labels[:prompt] == IGNORE_INDEX).all()
        assert (chosen.input_ids == image_token).sum() == N_IMG


def test_lm_mode_trains_on_the_chosen_answer_of_a_pair(tokenizer_dir, image_token, seed):
    rng = np.random.default_rng(seed)
    sample = _pair(rng)
    (lm,) = _encoder(tokenizer_dir, image_token).encode([(0, sample)])
    (dpo,) = _encoder(tokenizer_dir, image_token, mode="dpo").encode([(0, sample)])
    assert len(lm.sequences) == 1 and lm.sequences[0].input_ids.tolist() == dpo.sequences[0].input_ids.tolist()


def test_too_long_is_skipped_or_its_response_cut(tokenizer_dir, image_token, seed):
    rng = np.random.default_rng(seed)
    sample = _conversation(rng, 1)
    sample["conversations"][-1]["value"] = sentence(rng, 40, 60)
    (full,) = _encoder(tokenizer_dir, image_token).encode([(0, sample)])
    length = len(full.sequences[0])
    last_image = int(np.nonzero(full.sequences[0].input_ids == image_token)[0].max())
    first_label = int(np.nonzero(full.sequences[0].labels != IGNORE_INDEX)[0].min())

    (skip,) = _encoder(tokenizer_dir, image_token, max_seq_len=length - 1).encode([(0, sample)])
    assert skip.reason == "too_long" and "truncate_response: false" in skip.detail
    limit = int(rng.integers(first_label + 1, length))
    (cut,) = _encoder(tokenizer_dir, image_token, max_seq_len=limit, truncate_response=True).encode([(0, sample)])
    assert cut.truncated and len(cut.sequences[0]) == limit
    assert cut.sequences[0].input_ids.tolist() == full.sequences[0].input_ids[:limit].tolist()
    assert cut.sequences[0].labels.tolist() == full.sequences[0].labels[:limit].tolist()
    # Never cut into the images or leave nothing to train on: skip instead.
    for limit in (last_image, first_label):
        (skip,) = _encoder(tokenizer_dir, image_token, max_seq_len=limit, truncate_response=True).encode([(0, sample)])
        assert isinstance(skip, LoadSkip) and skip.reason == "too_long"


def test_pair_truncation_cuts_the_longer_response_first(tokenizer_dir, image_token, seed):
    rng = np.random.default_rng(seed)
    sample = _pair(rng)
    sample["chosen"], sample["rejected"] = sentence(rng, 3, 5), sentence(rng, 40, 60)
    (full,) = _encoder(tokenizer_dir, image_token, mode="dpo").encode([(0, sample)])
    chosen, rejected = (len(s) for s in full.sequences)
    prompt = int(np.nonzero(full.sequences[0].labels != IGNORE_INDEX)[0].min())
    short = chosen - prompt
    for limit in (chosen + rejected - 1, 2 * prompt + 2 * short + 1, 2 * prompt + 3):
        (cut,) = _encoder(tokenizer_dir, image_token, mode="dpo", max_seq_len=limit,
                          truncate_response=True).encode([(0, sample)])
        c, r = cut.sequences
        assert cut.truncated and len(c) + len(r) <= limit
        budget = limit - 2 * prompt
        keep = budget - short if short <= budget // 2 else budget // 2  # the largest that fits
        assert len(c) - prompt == min(short, keep) and len(r) - prompt == min(rejected - prompt, keep)
        assert c.input_ids[:prompt].tolist() == r.input_ids[:prompt].tolist()
        assert c.input_ids[:prompt].tolist() == full.sequences[0].input_ids[:prompt].tolist()
        assert (c.labels[prompt:] != IGNORE_INDEX).any() and (r.labels[prompt:] != IGNORE_INDEX).any()
    (skip,) = _encoder(tokenizer_dir, image_token, mode="dpo", max_seq_len=2 * prompt + 1,
                       truncate_response=True).encode([(0, sample)])
    assert skip.reason == "too_long"


def test_shared_prefix_pair_is_the_prompt_once_then_each_response(tokenizer_dir, image_token, seed):
    rng = np.random.default_rng(seed)
    samples = [_pair(rng) for _ in range(10)]
    separate = _encoder(tokenizer_dir, image_token, mode="dpo").encode(list(enumerate(samples)))
    shared = _encoder(tokenizer_dir, image_token, mode="dpo", dpo_layout="shared_prefix").encode(
        list(enumerate(samples)))
    for whole, tree in zip(separate, shared):
        assert tree.shared_prefix and tree.is_pair and len(tree.sequences) == 3
        prefix, chosen, rejected = tree.sequences
        for seq, branch in zip(whole.sequences, (chosen, rejected)):
            assert np.concatenate([prefix.input_ids, branch.input_ids]).tolist() == seq.input_ids.tolist()
            assert np.concatenate([prefix.labels, branch.labels]).tolist() == seq.labels.tolist()
        # The prompt is untrained, the image sits in it once, each branch starts with a trained token.
        assert (prefix.labels == IGNORE_INDEX).all() and prefix.num_images == 1 and chosen.num_images == 0
        assert chosen.labels[0] != IGNORE_INDEX and rejected.labels[0] != IGNORE_INDEX
        assert tree.length == whole.length - len(prefix)


def test_shared_prefix_pairs_fit_where_separate_ones_do_not(tokenizer_dir, image_token, seed):
    rng = np.random.default_rng(seed)
    sample = _pair(rng)
    (tree,) = _encoder(tokenizer_dir, image_token, mode="dpo", dpo_layout="shared_prefix").encode([(0, sample)])
    prompt = len(tree.sequences[0])
    (fits,) = _encoder(tokenizer_dir, image_token, mode="dpo", dpo_layout="shared_prefix",
                       max_seq_len=tree.length).encode([(0, sample)])
    (skip,) = _encoder(tokenizer_dir, image_token, mode="dpo", max_seq_len=tree.length).encode([(0, sample)])
    assert not fits.truncated and fits.length == tree.length and skip.reason == "too_long"
    (cut,) = _encoder(tokenizer_dir, image_token, mode="dpo", dpo_layout="shared_prefix", max_seq_len=prompt + 3,
                      truncate_response=True).encode([(0, sample)])
    assert cut.truncated and cut.length <= prompt + 3 and len(cut.sequences[0]) == prompt


def test_text_that_encodes_to_the_image_token_is_skipped(tokenizer_dir, image_token):
    sample = {"id": "t", "type": "conversation", "images": [],
              "conversations": [{"from": "human", "value": "what is <|image_pad|> ?"}, {"from": "gpt", "value": "x"}]}
    (skip,) = _encoder(tokenizer_dir, image_token).encode([(0, sample)])
    assert skip.reason == "image_token_in_text"


def test_qwen2_template_needs_chatml_tokens(tmp_path, image_token):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1, "<pad>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"needs <\|im_start\|> as one special token"):
        _encoder(tmp_path, image_token)
