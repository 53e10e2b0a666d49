"""FLOP accounting vs torch's FlopCounterMode on a real forward/backward; MFU arithmetic."""

import pytest
from torch.utils.flop_counter import FlopCounterMode

from kernels import linear_logprob
from pivot_mega.models.layers import PackedSeqs
from pivot_mega.profiling import ThroughputMeter, attended_pairs, forward_flops, peak_tflops, step_flops
from tests.parallel.test_equivalence import make_batch, split, tiny_config


def _run(model, mb, backward: bool) -> float:
    packed = PackedSeqs.from_position_ids(mb.position_ids)
    keep = mb.labels != -100
    with FlopCounterMode(display=False) as counter:
        hidden = model(mb.input_ids, mb.pixel_values, position_ids=mb.position_ids, cu_seqlens=packed.cu_seqlens,
                       return_hidden=True)
        # The plain head (one matmul over labelled positions): exactly the model FLOPs of the head. The
        # fused kernel adds a recompute in backward, which is its own cost, measured by its benchmark.
        logprobs = linear_logprob(hidden[keep], model.language.head_weight, mb.labels[keep], impl="naive")
        if backward:
            logprobs.sum().backward()
    return counter.get_total_flops()


def test_flops_match_torch_flop_counter(seed, monkeypatch):
    from pivot_mega.models import VisionLanguageModel, layers

    # torch's counter sees no FLOPs in CPU SDPA kernels; the einsum reference attention (same numbers,
    # every query-key pair of a row computed, then masked) is counted exactly.
    monkeypatch.setitem(layers._BACKENDS, "sdpa", lambda q, k, v, causal, packed: layers.reference_attention(
        q, k, v, causal=causal, packed=packed))

    config = tiny_config()
    model = VisionLanguageModel(config).init_weights(seed)
    (mb,) = split(make_batch(config, seed, 0), slice(0, 4), 1)
    batch, seqlen = mb.input_ids.shape
    labels = int((mb.labels != -100).sum())
    # A masked dense attention computes every query-key pair of each row: count densely here.
    ours = forward_flops(config, num_images=mb.pixel_values.shape[0], num_tokens=batch * seqlen,
                         attention_pairs=attended_pairs([seqlen] * batch, causal=False), num_labels=labels)
    assert _run(model, mb, backward=False) == ours.total

    # Forward + backward: everything 3x, except the patch embedding, whose input gradient is never
    # computed (pixels need none).
    measured = _run(model, mb, backward=True)
    v = config.vision
    conv = 2 * mb.pixel_values.shape[0] * (v.image_size // v.patch_size) ** 2 * 3 * v.patch_size ** 2 * v.hidden_size
    expected = step_flops(config, num_images=mb.pixel_values.shape[0], num_tokens=batch * seqlen,
                          attention_pairs=attended_pairs([seqlen] * batch, causal=False), num_labels=labels)
    assert measured == expected.total - conv


def test_causal_packing_and_frozen_vision():
    assert attended_pairs([3, 5]) == 6 + 15 and attended_pairs([3, 5], causal=False) == 9 + 25
    config = tiny_config()
    kwargs = dict(num_images=2, num_tokens=48, attention_pairs=100, num_labels=10)
    fwd = forward_flops(config, **kwargs)
    frozen = step_flops(config, trainable=("projector",), **kwargs)
    full = step_flops(config, **kwargs)
    assert frozen.vision == fwd.vision and full.vision == 3 * fwd.vision
    assert frozen.language == full.language == 3 * fwd.language


def test_peak_table_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H200") == 989.4 and peak_tflops("NVIDIA H100 PCIe", "fp8") == 1513.0
    assert peak_tflops("cpu") is None
    meter = ThroughputMeter(num_devices=8, peak_tflops_per_device=989.4)
    meter.add_step(tokens=1000, flops=8 * 989.4e12 * 0.5)  # half the peak for one second
    meter._start -= 1.0
    summary = meter.summary()
    assert summary["mfu"] == pytest.approx(0.5, rel=1e-3)
    assert summary["tokens_per_s"] == pytest.approx(1000, rel=1e-3)
