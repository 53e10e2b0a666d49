"""Saliency: maps equal a sample-by-sample autograd reference (SFT and DPO, packed rows), the picture
pipeline (border, min-max, gamma, jet, overlay), PNG files and sizes, the command line."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pivot_mega.cli import main
from pivot_mega.data.shard_builder import BuildOptions, build_shards
from pivot_mega.eval.saliency import (PANEL_GAP, SaliencyError, build_loader, image_saliency, jet,
                                      normalise_map, overlay, replace_border, run_saliency)
from pivot_mega.training.losses import DPOConfig
from tests.data.helpers import dpo_rows, llava_rows, write_images, write_json
from tests.eval.conftest import tiny_model
from tests.hf_models import rel_err

SIZE, GRID = 64, 4  # model_tiny.yaml: 64 px images, 4 x 4 patches


@pytest.fixture(scope="module")
def llava_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llava")
    rng = np.random.default_rng(0)
    rows = llava_rows(rng, write_images(tmp / "img", rng, 6), max_turns=2)
    rows.append({"id": "text-only", "conversations": [{"from": "human", "value": "hi"},
                                                      {"from": "gpt", "value": "hello"}]})
    write_json(tmp / "llava.json", rows)
    build_shards("llava", tmp / "llava.json", tmp / "shards", tmp / "img", BuildOptions(workers=1, progress=False))
    return tmp / "shards"


@pytest.fixture(scope="module")
def dpo_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    rng = np.random.default_rng(1)
    write_json(tmp / "dpo.json", dpo_rows(rng, write_images(tmp / "img", rng, 4)))
    build_shards("dpo", tmp / "dpo.json", tmp / "shards", tmp / "img", BuildOptions(workers=1, progress=False))
    return tmp / "shards"


@pytest.fixture(scope="module")
def model(image_token):
    return tiny_model(image_token, seed=2)


def _first_batch(model, shards, tokenizer_dir, loss, max_seq_len=320):
    loader = build_loader(model.config, shards, tokenizer_dir, loss=loss, max_seq_len=max_seq_len, backend="python")
    try:
        return next(iter(loader))
    finally:
        loader.close()


def _segments(model, batch):
    """(ids, labels, pixel_values) of each non-padding segment, unpacked, in order."""
    flat_ids, flat_labels = batch.input_ids.reshape(-1), batch.labels.reshape(-1)
    cu, tokens = batch.packed.cu_seqlens.tolist(), model.config.num_image_tokens
    out, image = [], 0
    for k in range(len(cu) - 1):
        ids, labels = flat_ids[cu[k]:cu[k + 1]], flat_labels[cu[k]:cu[k + 1]]
        count = int((ids == model.config.image_token_id).sum()) // tokens
        out.append((ids, labels, batch.pixel_values[image:image + count]))
        image += count
    return out


def _naive_logprob(model, ids, labels, pixels):
    """(summed log-prob of the labelled tokens, token count, the image-feature leaf): full logits."""
    leaf = model.encode_images(pixels).detach().requires_grad_(True)
    logits = model.language.logits(model.language.forward_hidden(model.embed(ids[None], leaf)))[0]
    targets = labels[1:]
    keep = targets != -100
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)[keep].gather(1, targets[keep, None]).sum()
    return logp, int(keep.sum()), leaf


def _l1_map(grad):
    return grad.abs().sum(-1).reshape(-1, GRID, GRID)


def test_sft_map_equals_an_unpacked_autograd_reference(model, llava_shards, tokenizer_dir):
    batch = _first_batch(model, llava_shards, tokenizer_dir, "sft")
    assert batch.pixel_values.shape[0] >= 2  # several samples packed in the row
    items = image_saliency(model, batch, loss="sft")
    assert len(items) == batch.pixel_values.shape[0] and all(i.role == "response" for i in items)

    expected, losses = [], []
    for ids, labels, pixels in _segments(model, batch):
        if len(pixels) == 0:
            continue
        logp, count, leaf = _naive_logprob(model, ids, labels, pixels)
        loss = -logp / count
        # The same loss through cross entropy: the reference is the plain definition.
        logits = model.language.logits(model.language.forward_hidden(model.embed(ids[None], leaf)))[0]
        assert torch.allclose(F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100).double(), loss, atol=1e-5)
        expected.append(_l1_map(torch.autograd.grad(loss, leaf)[0]))
        losses += [loss.item()] * len(pixels)
    expected = torch.cat(expected)
    ours = torch.stack([i.raw for i in items])
    assert ours.shape == (len(items), GRID, GRID) and ours.abs().max() > 0
    assert rel_err(ours, expected) < 1e-4
    assert [i.loss for i in items] == pytest.approx(losses, rel=1e-5)


def test_dpo_maps_equal_an_unpacked_autograd_reference(model, image_token, dpo_shards, tokenizer_dir):
    batch = _first_batch(model, dpo_shards, tokenizer_dir, "dpo", max_seq_len=640)
    assert len(batch.pair_segments) >= 2
    reference = tiny_model(image_token, seed=9)
    config = DPOConfig(beta=0.3)
    items = image_saliency(model, batch, loss="dpo", reference=reference, dpo_config=config)
    segments = _segments(model, batch)

    expected = {}
    for p, (c, r) in enumerate(batch.pair_segments.tolist()):
        policy, ref = {}, {}
        for role, s in (("chosen", c), ("rejected", r)):
            policy[role] = _naive_logprob(model, *segments[s])
            with torch.no_grad():
                ref[role] = _naive_logprob(reference, *segments[s])[0]
        margin = (policy["chosen"][0] - ref["chosen"]) - (policy["rejected"][0] - ref["rejected"])
        loss = -F.logsigmoid(config.beta * margin)
        grads = torch.autograd.grad(loss, [policy["chosen"][2], policy["rejected"][2]])
        expected[(p, "chosen")], expected[(p, "rejected")] = _l1_map(grads[0])[0], _l1_map(grads[1])[0]
        for item in items:
            if item.pair == p:
                assert item.loss == pytest.approx(loss.item(), rel=1e-5)
    assert sorted((i.pair, i.role) for i in items) == sorted(expected)
    ours = torch.stack([i.raw for i in items])
    assert ours.abs().max() > 0
    assert rel_err(ours, torch.stack([expected[(i.pair, i.role)] for i in items])) < 1e-4
    # The same pair's chosen and rejected maps differ: each is the gradient at its own copy of the image.
    assert not torch.allclose(items[0].raw, next(i.raw for i in items if i.pair == items[0].pair and i is not items[0]))

    # Default reference: the model itself, as constants; equal to passing a copy of it.
    alone = image_saliency(model, batch, loss="dpo")
    with_copy = image_saliency(model, batch, loss="dpo", reference=copy.deepcopy(model))
    assert all(torch.allclose(a.raw, b.raw, rtol=1e-5, atol=0) for a, b in zip(alone, with_copy))
    assert all(a.loss == pytest.approx(np.log(2)) for a in alone)  # h = 0 at the reference


def test_picture_pipeline():
    raw = torch.arange(36, dtype=torch.float32).reshape(6, 6) + 100.0
    raw[0, 0] = 1e6  # a border outlier, as register tokens make
    replaced = replace_border(raw, torch.Generator().manual_seed(0))
    assert torch.equal(replaced[1:-1, 1:-1], raw[1:-1, 1:-1])
    for col in range(6):
        assert replaced[0, col] in (raw[1, col], raw[2, col]) or col in (0, 5)
    for row in range(6):  # columns come after rows: corners take inner values too
        assert replaced[row, 0] in replaced[row, 1:3] and replaced[row, 5] in replaced[row, 3:5]
    assert replaced.max() < 1e6

    heat = normalise_map(raw, generator=torch.Generator().manual_seed(0))
    assert heat.min() == 0.0 and heat.max() == 1.0
    linear = (replaced - replaced.min()) / (replaced.max() - replaced.min())
    assert torch.allclose(heat, linear.pow(1.1))
    assert torch.equal(normalise_map(torch.ones(4, 4)), torch.zeros(4, 4))

    # matplotlib's jet at its ends and middle.
    np.testing.assert_allclose(jet(np.array([0.0, 0.5, 1.0])),
                               [[0, 0, 0.5], [0.15 / 0.31, 1, 1 - 0.16 / 0.31], [0.5, 0, 0]], atol=1e-9)
    image = np.full((2, 2, 3), 200, dtype=np.uint8)
    # 0.4 * (0.7 * 200) + 0.6 * 255 * jet(1) = (56 + 76.5, 56, 56)
    assert overlay(image, np.ones((2, 2)))[0, 0].tolist() == [132, 56, 56]


def test_pngs_sft_and_dpo_side_by_side(tmp_path, model, llava_shards, dpo_shards, tokenizer_dir):
    loader = build_loader(model.config, llava_shards, tokenizer_dir, loss="sft", max_seq_len=256, backend="python")
    entries = run_saliency(model, loader, tmp_path / "sft", max_images=4, progress=False)
    loader.close()
    assert len(entries) == 4
    for entry in entries:
        assert Image.open(tmp_path / "sft" / entry["file"]).size == (SIZE, SIZE)
        assert np.load(tmp_path / "sft" / entry["raw"]).shape == (1, GRID, GRID) and entry["roles"] == ["response"]
    index = json.loads((tmp_path / "sft" / "index.json").read_text())
    assert index["loss"] == "sft" and index["gamma"] == 1.1 and index["maps"] == entries

    loader = build_loader(model.config, dpo_shards, tokenizer_dir, loss="dpo", max_seq_len=512, backend="python")
    entries = run_saliency(model, loader, tmp_path / "dpo", loss="dpo", max_images=3, progress=False)
    loader.close()
    assert len(entries) == 3 and len({e["sample_id"] for e in entries}) == 3
    for entry in entries:
        assert entry["roles"] == ["chosen", "rejected"]
        picture = np.asarray(Image.open(tmp_path / "dpo" / entry["file"]))
        assert picture.shape == (SIZE, 2 * SIZE + PANEL_GAP, 3)
        assert (picture[:, SIZE:SIZE + PANEL_GAP] == 255).all()
        assert not np.array_equal(picture[:, :SIZE], picture[:, SIZE + PANEL_GAP:])
        assert np.load(tmp_path / "dpo" / entry["raw"]).shape == (2, GRID, GRID)


def test_command_line(tmp_path, tiny_ckpt, dpo_shards, llava_shards, tokenizer_dir, capsys):
    common = ["--ckpt", str(tiny_ckpt), "--tokenizer", str(tokenizer_dir), "--backend", "python", "--no-progress"]
    assert main(["eval", "saliency", *common, "--data", str(dpo_shards), "--loss", "dpo", "--reference",
                 str(tiny_ckpt), "--max-images", "2", "--out", str(tmp_path / "dpo")]) == 0
    assert "wrote 2 map(s)" in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "dpo").glob("*.png"))
    assert len(files) == 2 and Image.open(tmp_path / "dpo" / files[0]).size == (2 * SIZE + PANEL_GAP, SIZE)
    # DPO needs pairs: LLaVA conversations are refused with the shards named.
    assert main(["eval", "saliency", *common, "--data", str(llava_shards), "--loss", "dpo",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"pivot-mega eval saliency: error: {llava_shards}: data.mode 'dpo' needs preference pairs" in err


def test_errors_name_the_problem(model, llava_shards, tokenizer_dir):
    batch = _first_batch(model, llava_shards, tokenizer_dir, "sft")
    with pytest.raises(SaliencyError, match="loss 'dpo' needs preference pairs"):
        image_saliency(model, batch, loss="dpo")
    with pytest.raises(SaliencyError, match="loss 'kl': choose sft or dpo"):
        image_saliency(model, batch, loss="kl")
