"""Attention backends, packed sequences, BF16 autocast."""

import pytest
import torch

from pivot_mega.models import AttentionBackendError, PackedSeqs, available_backends
from pivot_mega.models import layers
from pivot_mega.models.layers import attention, per_segment_pays, reference_attention, resolve_backend
from tests.hf_models import mllm_inputs, rel_err, tiny_model

TOL = 1e-5
CPU_BACKENDS = available_backends("cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("groups", [1, 3])
def test_backends_match_reference_attention(backend, causal, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, seqlen, kv_heads, dim = 2, 29, 2, 16
    q = torch.randn(batch, seqlen, kv_heads * groups, dim, generator=gen)
    k, v = (torch.randn(batch, seqlen, kv_heads, dim, generator=gen) for _ in range(2))
    packed = PackedSeqs.from_lengths([[7, 12, 10], [29]])
    for layout in (None, packed):
        expected = reference_attention(q, k, v, causal=causal, packed=layout)
        got = attention(q, k, v, causal=causal, packed=layout, backend=backend)
        assert rel_err(got, expected) <= TOL, (backend, layout)


def test_packed_layout_checks():
    packed = PackedSeqs.from_lengths([[3, 5], [8]])
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], list(range(8))]
    assert packed.segment_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [2] * 8]
    with pytest.raises(ValueError, match="crosses a row boundary"):
        PackedSeqs.from_cu_seqlens(torch.tensor([0, 3, 10, 16], dtype=torch.int32), 2, 8)
    with pytest.raises(ValueError, match="from 0 to B\\*S=16"):
        PackedSeqs.from_cu_seqlens(torch.tensor([0, 3, 8], dtype=torch.int32), 2, 8)
    with pytest.raises(ValueError, match="strictly increasing"):
        PackedSeqs.from_cu_seqlens(torch.tensor([0, 8, 8, 16], dtype=torch.int32), 2, 8)
    assert PackedSeqs.from_position_ids(packed.position_ids).cu_seqlens.tolist() == [0, 3, 8, 16]
    assert PackedSeqs.from_cu_seqlens(packed.cu_seqlens, 2, 8).position_ids.tolist() == packed.position_ids.tolist()
    with pytest.raises(ValueError, match="must start every row at 0"):
        PackedSeqs.from_position_ids(torch.tensor([[0, 1, 2], [3, 0, 1]]))


def test_shared_prefix_layout_positions_and_checks():
    # Row 0: prefix (4) | chosen (3) | rejected (2) | padding (1); row 1: one plain segment.
    packed = PackedSeqs.from_lengths([[4, 3, 2, 1], [10]], prefix=[-1, 0, 0, -1, -1])
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 4, 5, 0], list(range(10))]
    assert packed.prefix_ids.tolist() == [[-1] * 4 + [0] * 5 + [-1], [-1] * 10]
    mask = packed.attends(causal=True)[0]
    rejected, chosen, prefix = 7, 4, 2
    assert mask[rejected, prefix] and mask[chosen, prefix] and mask[rejected, rejected]
    assert not mask[rejected, chosen] and not mask[chosen, rejected] and not mask[prefix, chosen]
    assert not mask[9, 3]  # padding sees only itself
    for bad in ([-1, 0, 1, -1, -1], [-1, 2, 0, -1, -1], [-1, 0, 0, -1, 0]):  # nested, later, other row
        with pytest.raises(ValueError, match="prefix"):
            PackedSeqs.from_lengths([[4, 3, 2, 1], [10]], prefix=bad)
    # TE's thd attention takes one cu_seqlens for queries and keys: no prefix (varlen kernels take two)
    with pytest.raises(AttentionBackendError, match="cannot express a shared prefix"):
        resolve_backend("te", "cuda", packed=True, dtype=torch.bfloat16, prefixes=True)
    assert resolve_backend("auto", "cpu", packed=True, dtype=torch.float32, prefixes=True) == "sdpa"


def _varlen_semantics(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """What flash-attn's varlen kernels compute, written out: segment i's queries against its run of keys,
    causality aligned to the end of the run (query j of n sees keys up to j + len_k - n)."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        n, m = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        assert n <= max_q and m <= max_k
        keys, values = (t[ks].repeat_interleave(groups, dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q[qs], keys) / q.shape[-1] ** 0.5
        if causal:
            visible = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
            scores = scores.masked_fill(~visible, float("-inf"))
        out[qs] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    return out


def test_varlen_inputs_express_a_shared_prefix(seed):
    """The query / key runs handed to the varlen kernels give the tree's attention (checked on the kernels'
    documented semantics; the kernels themselves need CUDA)."""
    from pivot_mega.models.layers import varlen_inputs

    gen = torch.Generator().manual_seed(seed)
    packed = PackedSeqs.from_lengths([[5, 4, 3, 4], [16]], prefix=[-1, 0, 0, -1, -1])
    q = torch.randn(2, 16, 4, 8, generator=gen)
    k, v = (torch.randn(2, 16, 2, 8, generator=gen) for _ in range(2))
    flat_q, flat_k, flat_v, cu_q, cu_k, max_q, max_k = varlen_inputs(q, k, v, packed)
    assert cu_k.tolist() == [0, 5, 14, 22, 26, 42] and max_k == 16  # branches: prefix (5) + own tokens
    got = _varlen_semantics(flat_q, flat_k, flat_v, cu_q.tolist(), cu_k.tolist(), max_q, max_k, causal=True)
    want = reference_attention(q, k, v, causal=True, packed=packed)
    assert rel_err(got.view(2, 16, 4, 8), want) <= TOL


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shared_prefix_attention_equals_each_branch_after_its_prefix(backend, seed):
    """prefix | chosen | rejected in one row: each branch's outputs equal those of prefix + branch alone."""
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, dim, n_prefix, n_chosen, n_rejected = 4, 2, 8, 6, 5, 4
    total = n_prefix + n_chosen + n_rejected

    def qkv(n):
        return (torch.randn(1, n, heads, dim, generator=gen), torch.randn(1, n, kv_heads, dim, generator=gen),
                torch.randn(1, n, kv_heads, dim, generator=gen))
    (qp, kp, vp), (qc, kc, vc), (qr, kr, vr) = qkv(n_prefix), qkv(n_chosen), qkv(n_rejected)
    q, k, v = (torch.cat(parts, 1) for parts in ((qp, qc, qr), (kp, kc, kr), (vp, vc, vr)))
    tree = PackedSeqs.from_lengths([[n_prefix, n_chosen, n_rejected]], prefix=[-1, 0, 0])
    got = attention(q, k, v, causal=True, packed=tree, backend=backend)
    chosen = reference_attention(torch.cat([qp, qc], 1), torch.cat([kp, kc], 1), torch.cat([vp, vc], 1), causal=True)
    rejected = reference_attention(torch.cat([qp, qr], 1), torch.cat([kp, kr], 1), torch.cat([vp, vr], 1), causal=True)
    assert total == got.shape[1]
    assert rel_err(got[:, :n_prefix + n_chosen], chosen) <= TOL
    assert rel_err(got[:, n_prefix + n_chosen:], rejected[:, n_prefix:]) <= TOL
    assert rel_err(reference_attention(q, k, v, causal=True, packed=tree), got) <= TOL


def test_gpu_only_backends_fail_clearly_on_cpu():
    assert resolve_backend("auto", "cpu", packed=True, dtype=torch.float32) == "sdpa"
    assert resolve_backend("auto", "cpu", packed=True, dtype=torch.float32, segments_pay=True) == "sdpa_segments"
    assert resolve_backend("auto", "cpu", packed=False, dtype=torch.float32, segments_pay=True) == "sdpa"
    for name in ("varlen", "flash_attn", "te"):
        with pytest.raises(AttentionBackendError, match=f"{name}.*not available on cpu"):
            resolve_backend(name, "cpu", packed=True, dtype=torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_batch_equals_samples_one_by_one(backend, seed):
    model, case = tiny_model(seed, attention_backend=backend)
    # Four samples of different lengths (one without an image) packed into two rows of 64 tokens.
    t = case.image_tokens
    gen = torch.Generator().manual_seed(seed)
    lengths = [[t + 9, 64 - (t + 9)], [t + 20, 64 - (t + 20)]]
    has_image = [[True, False], [True, True]]
    samples, images = [], []
    for row_lengths, row_images in zip(lengths, has_image):
        for length, with_image in zip(row_lengths, row_images):
            ids = torch.randint(0, case.vocab - 1, (length,), generator=gen)
            if with_image:
                ids[1:1 + t] = case.image_token_id
                images.append(torch.randn(3, case.image_size, case.image_size, generator=gen))
            samples.append((ids, with_image))
    packed_ids = torch.stack([torch.cat([samples[0][0], samples[1][0]]), torch.cat([samples[2][0], samples[3][0]])])
    packed = PackedSeqs.from_lengths(lengths)
    with torch.no_grad():
        packed_logits = model(packed_ids, torch.stack(images), packed=packed).flatten(0, 1)
        image_iter = iter(images)
        singles = [model(ids[None], next(image_iter)[None] if with_image else None)[0]
                   for ids, with_image in samples]
    expected = torch.cat(singles)
    assert rel_err(packed_logits, expected) <= TOL


def test_bf16_autocast_is_close_to_fp32(seed):
    model, case = tiny_model(seed)
    ids, pixels = mllm_inputs(case, seed)
    with torch.no_grad():
        reference = model(ids, pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids, pixels)
    assert low.dtype == torch.bfloat16
    assert rel_err(low, reference) < 5e-2


def test_init_is_reproducible_and_seeded_per_name(seed):
    a, _ = tiny_model(seed)
    b, _ = tiny_model(seed)
    c, _ = tiny_model(seed + 1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["segments", "shared_prefix"])
def test_cpu_per_segment_sdpa_equals_the_dense_mask(monkeypatch, causal, layout, seed):
    """The per-segment SDPA backend (``sdpa_segments``) against the dense [S, S] mask: outputs and the
    gradients of q, k and v, on random packed rows with padding (and shared prefixes)."""
    import pivot_mega.models.layers as layers

    gen = torch.Generator().manual_seed(seed)
    if layout == "segments":
        packed = PackedSeqs.from_lengths([[70, 90, 32, 8], [130, 70]])
    else:  # prefix | chosen | rejected | padding, two rows
        packed = PackedSeqs.from_lengths([[80, 40, 50, 30], [100, 60, 40]], prefix=[-1, 0, 0, -1, -1, 4, 4])
    shape = (2, 200)
    q = torch.randn(*shape, 4, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(*shape, 2, 16, generator=gen, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(*shape, 4, 16, generator=gen)

    def run(backend):
        for t in (q, k, v):
            t.grad = None
        out = attention(q, k, v, causal=causal, packed=packed, backend=backend)
        out.backward(grad_out)
        return [out.detach()] + [t.grad.clone() for t in (q, k, v)]

    calls = []
    per_segment = layers._BACKENDS["sdpa_segments"]
    monkeypatch.setitem(layers._BACKENDS, "sdpa_segments", lambda *a: calls.append(1) or per_segment(*a))
    dense = run("sdpa")
    assert not calls
    segments = run("sdpa_segments")
    assert calls
    for got, want in zip(segments, dense):
        assert rel_err(got, want) <= 1e-5
    assert rel_err(segments[0], reference_attention(q, k, v, causal=causal, packed=packed)) <= TOL


def test_auto_takes_per_segment_attention_where_it_pays_on_cpu(seed, monkeypatch):
    """Short rows (the demo's 256 tokens of 30-60 token samples) keep the dense mask; long rows of few
    segments run per segment, with the same numbers."""
    short = PackedSeqs.from_lengths([[36] * 7 + [4]] * 4)
    long = PackedSeqs.from_lengths([[256] * 8])
    # 2048-token row, prefix | chosen | rejected: the branches' keys include the prefix's
    tree = PackedSeqs.from_lengths([[1024, 512, 512]], prefix=[-1, 0, 0])
    assert not per_segment_pays(short, 4, 256)
    assert per_segment_pays(long, 1, 2048) and per_segment_pays(tree, 1, 2048)
    # one segment a row costs the same pairs either way; per segment adds its fixed costs
    assert not per_segment_pays(PackedSeqs.from_lengths([[64]] * 4), 4, 64)
    # two segments of 256: the per-segment estimate (2 x 17,000 + 512 x 240 + 0.5 x 2 x 256^2) against 512^2
    assert per_segment_pays(PackedSeqs.from_lengths([[256, 256]]), 1, 512) == (
        2 * 17_000 + 512 * 240 + 0.5 * 2 * 256 ** 2 < 512 ** 2)
    ran = []
    for name in ("sdpa", "sdpa_segments"):
        kernel = layers._BACKENDS[name]
        monkeypatch.setitem(layers._BACKENDS, name, lambda *args, _k=kernel, _n=name: ran.append(_n) or _k(*args))
    gen = torch.Generator().manual_seed(seed)
    for layout, expected in ((short, "sdpa"), (long, "sdpa_segments"), (tree, "sdpa_segments")):
        rows, seqlen = layout.position_ids.shape
        q = torch.randn(rows, seqlen, 4, 16, generator=gen)
        k, v = (torch.randn(rows, seqlen, 2, 16, generator=gen) for _ in range(2))
        ran.clear()
        got = attention(q, k, v, causal=True, packed=layout, backend="auto")
        assert ran == [expected]
        assert rel_err(got, reference_attention(q, k, v, causal=True, packed=layout)) <= TOL
