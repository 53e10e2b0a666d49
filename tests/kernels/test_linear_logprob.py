"""linear_logprob: chunked and naive paths against fp64, the API's checks, vocab-parallel TP=2 vs TP=1.

Tolerances: ``tests/kernels/reference.py::tolerances`` (fp32 rounding of logits up to 1e4, rounding of
bf16 / fp16 gradients). The Triton kernels are tested in test_triton_linear_logprob.py.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist

from pivot_mega.kernels.linear_logprob import (KernelUnavailableError, linear_logprob, naive_linear_logprob,
                                               resolve_impl)
from tests.distributed import require_procs, run_workers
from tests.kernels.reference import IGNORE_INDEX, Case, Result, assert_close, make_case, reference, run

# (N, H, V, token_chunk, vocab_chunk): one token; N and V not multiples of their chunks; one chunk
# wider than the vocabulary; vocab chunk 1 (every logit its own tile).
SHAPES = [(1, 8, 10, 4, 4), (37, 24, 101, 16, 32), (64, 48, 300, 64, 128), (96, 32, 257, 40, 512),
          (9, 16, 23, 2, 1)]


@pytest.mark.parametrize("impl", ["chunked", "naive"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}-t{}-v{}".format(*s))
def test_values_and_grads_match_fp64(impl, shape, seed):
    num_tokens, hidden_size, vocab, token_chunk, vocab_chunk = shape
    case = make_case(seed, num_tokens, hidden_size, vocab)
    assert_close(run(case, impl=impl, token_chunk=token_chunk, vocab_chunk=vocab_chunk), case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_fp32(dtype, seed):
    case = make_case(seed, 50, 64, 211, dtype)
    got = run(case, impl="chunked", token_chunk=16, vocab_chunk=64)
    assert got.logprob.dtype == torch.float32
    assert_close(got, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_up_to_1e4_stay_finite_and_accurate(dtype, seed):
    case = make_case(seed, 33, 40, 150, dtype, max_logit=1e4)
    got = run(case, impl="chunked", token_chunk=8, vocab_chunk=32)
    expected = reference(case)
    # The planted bottom-logit label: far below anything fp32 exp() could represent. Its row's logit range
    # is a random share of 2 x 1e4 (-6.8e3 to -2.0e4 over 600 seeds), so the bound is 5e3, not 1e4.
    assert expected.logprob[-1] < -5e3
    assert torch.isfinite(got.logprob).all() and torch.isfinite(got.grad_hidden).all()
    assert_close(got, case, expected)


def test_fp64_inputs_give_fp64_results(seed):
    case = make_case(seed, 20, 16, 45, torch.float64)
    got = run(case, impl="chunked", token_chunk=7, vocab_chunk=10)
    expected = reference(case)
    assert got.logprob.dtype == torch.float64
    assert (got.logprob - expected.logprob).abs().max() <= 1e-12
    assert (got.grad_weight - expected.grad_weight).abs().max() <= 1e-12


def test_ignored_rows_have_zero_logprob_and_gradient(seed):
    case = make_case(seed, 30, 16, 64, ignored=10)
    ignored = case.labels == IGNORE_INDEX
    got = run(case, impl="chunked", token_chunk=8, vocab_chunk=16)
    assert int(ignored.sum()) == 10
    assert (got.logprob[ignored] == 0).all() and (got.grad_hidden[ignored] == 0).all()
    assert (got.logprob[~ignored] < 0).all() and (got.grad_hidden[~ignored] != 0).any(dim=1).all()
    assert got.num_tokens == 20
    assert_close(got, case)


def test_sft_loss_and_accuracy_outputs(seed):
    case = make_case(seed, 40, 16, 30)
    # Make some labels the top logit so that the accuracy is not trivially 0.
    logits = case.hidden @ case.weight.T
    case.labels[:10] = logits[:10].argmax(dim=1)
    hidden = case.hidden.clone().requires_grad_()
    out = linear_logprob(hidden, case.weight, case.labels, return_stats=True, impl="chunked", vocab_chunk=8)
    expected = reference(case)
    assert abs(float(out.loss.detach()) - float(expected.loss)) <= 1e-5
    assert int(out.num_correct) == expected.num_correct >= 10
    assert float(out.accuracy) == pytest.approx(expected.num_correct / expected.num_tokens)
    # The loss is differentiable: its gradient is -1/num_tokens times d(sum logprob)/d hidden.
    out.loss.backward()
    ref_hidden = case.hidden.double().requires_grad_()
    ref_logprob = torch.log_softmax(ref_hidden @ case.weight.double().T, -1).gather(
        1, case.labels.clamp(min=0)[:, None]).squeeze(1)
    (-(ref_logprob * (case.labels != IGNORE_INDEX)).sum() / expected.num_tokens).backward()
    assert (hidden.grad - ref_hidden.grad).abs().max() <= 1e-6


def test_all_rows_ignored_gives_zero_loss_and_zero_grads(seed):
    case = make_case(seed, 6, 8, 12)
    case.labels[:] = IGNORE_INDEX
    got = run(case, impl="chunked")
    assert float(got.loss) == 0 and got.num_tokens == 0 and got.num_correct == 0
    assert (got.logprob == 0).all() and (got.grad_hidden == 0).all() and (got.grad_weight == 0).all()


def test_only_the_needed_gradients_are_computed(seed):
    case = make_case(seed, 12, 8, 20)
    hidden = case.hidden.clone().requires_grad_()
    logprob = linear_logprob(hidden, case.weight, case.labels, impl="chunked", vocab_chunk=8)
    logprob.sum().backward()
    assert case.weight.grad is None
    expected = reference(Case(case.hidden, case.weight, case.labels, grad_output=torch.ones(12)))
    assert (hidden.grad.double() - expected.grad_hidden).abs().max() <= 1e-5
    with torch.no_grad():  # a reference model's pass: values only
        assert torch.equal(linear_logprob(hidden, case.weight, case.labels, impl="chunked", vocab_chunk=8),
                           logprob.detach())


def test_auto_is_chunked_on_cpu(seed):
    case = make_case(seed, 10, 8, 40)
    auto = linear_logprob(case.hidden, case.weight, case.labels, ignore_index=IGNORE_INDEX)
    chunked = linear_logprob(case.hidden, case.weight, case.labels, ignore_index=IGNORE_INDEX, impl="chunked")
    assert torch.equal(auto, chunked)


# ---------------------------------------------------------------------------------------------
# Choosing an implementation

F32, BF16 = torch.float32, torch.bfloat16


def test_auto_picks_triton_on_cuda_only_when_it_can_run():
    assert resolve_impl("auto", device_type="cuda", dtype=BF16, triton_error=None, interpret=False) == "triton"
    assert resolve_impl("auto", device_type="cuda", dtype=BF16, triton_error="ImportError: x",
                        interpret=False) == "chunked"
    assert resolve_impl("auto", device_type="cuda", dtype=torch.float64, triton_error=None,
                        interpret=False) == "chunked"
    assert resolve_impl("auto", device_type="cpu", dtype=F32, triton_error=None, interpret=False) == "chunked"
    # The interpreter is for tests that ask for triton by name, never an automatic choice.
    assert resolve_impl("auto", device_type="cpu", dtype=F32, triton_error=None, interpret=True) == "chunked"


def test_explicit_impls_that_cannot_run_say_why():
    with pytest.raises(KernelUnavailableError, match="needs the triton package.*No module named 'triton'"):
        resolve_impl("triton", device_type="cuda", dtype=BF16,
                     triton_error="ModuleNotFoundError: No module named 'triton'", interpret=False)
    with pytest.raises(KernelUnavailableError, match="runs on CUDA tensors.*TRITON_INTERPRET=1.*hidden is on cpu"):
        resolve_impl("triton", device_type="cpu", dtype=F32, triton_error=None, interpret=False)
    with pytest.raises(KernelUnavailableError, match="takes .*hidden is torch.float64; use impl='chunked'"):
        resolve_impl("triton", device_type="cuda", dtype=torch.float64, triton_error=None, interpret=False)
    with pytest.raises(ValueError, match="unknown impl 'fused'"):
        resolve_impl("fused", device_type="cpu", dtype=F32, triton_error=None, interpret=False)
    assert resolve_impl("triton", device_type="cpu", dtype=BF16, triton_error=None, interpret=True) == "triton"
    for impl in ("chunked", "naive"):
        assert resolve_impl(impl, device_type="cuda", dtype=BF16, triton_error="x", interpret=False) == impl


def test_triton_on_cpu_outside_the_interpreter_is_refused(seed):
    case = make_case(seed, 4, 8, 16)
    with pytest.raises(KernelUnavailableError, match="hidden is on cpu"):
        linear_logprob(case.hidden, case.weight, case.labels, impl="triton")


# ---------------------------------------------------------------------------------------------
# Input checks


def test_bad_inputs_name_the_tensor_and_shapes(seed):
    case = make_case(seed, 5, 8, 16)
    h, w, y = case.hidden, case.weight, case.labels
    with pytest.raises(ValueError, match=r"hidden \(5, 8\) and weight \(16, 7\) disagree on the hidden size H"):
        linear_logprob(h, w[:, :7], y)
    with pytest.raises(ValueError, match=r"labels \(4,\) and hidden \(5, 8\) disagree on the number of tokens"):
        linear_logprob(h, w, y[:4])
    with pytest.raises(ValueError, match=r"expects hidden \[N, H\].*hidden \(1, 5, 8\)"):
        linear_logprob(h[None], w, y)
    y_bad = y.clone()
    y_bad[3] = 16
    with pytest.raises(ValueError, match=r"labels\[3\] = 16 is outside the vocabulary \[0, 16\)"):
        linear_logprob(h, w, y_bad)
    y_bad[3] = -1
    with pytest.raises(ValueError, match=r"labels\[3\] = -1 is outside.*ignore_index=-100"):
        linear_logprob(h, w, y_bad)
    with pytest.raises(TypeError, match=r"hidden \(torch.bfloat16\) and weight \(torch.float32\)"):
        linear_logprob(h.bfloat16(), w, y)
    with pytest.raises(TypeError, match="labels must be integer token ids, got torch.float32"):
        linear_logprob(h, w, y.float())
    with pytest.raises(ValueError, match="vocab_chunk must be a positive int"):
        linear_logprob(h, w, y, vocab_chunk=0)


# ---------------------------------------------------------------------------------------------
# Vocab-parallel: TP=2 over gloo equals TP=1


def _tp_worker(rank, world_size, case, impl, chunks):
    if impl == "triton":
        import os

        # Set before the Triton module is first imported in this fresh process.
        os.environ["TRITON_INTERPRET"] = "1"
    vocab_local = case.weight.shape[0] // world_size
    shard = case.weight[rank * vocab_local:(rank + 1) * vocab_local]
    # Plain dicts across the process boundary: results are unpickled with torch's weights-only rules.
    return dataclasses.asdict(run(case, weight=shard, tp_group=dist.group.WORLD, impl=impl, **chunks))


@require_procs(2)
@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl", ["chunked", "naive", "triton"])
def test_tp2_equals_tp1(impl, seed):
    if impl == "triton":
        pytest.importorskip("triton", reason="the triton path is tested in Triton's CPU interpreter")
    # 2 x 53 vocabulary rows: the label of a token lives on one rank only.
    case = make_case(seed, 21, 24, 106, max_logit=50.0)
    chunks = {"token_chunk": 8, "vocab_chunk": 16}
    single = run(case, impl="chunked", **chunks)
    ranks = [Result(**fields) for fields in run_workers(_tp_worker, 2, case, impl, chunks)]
    labels_rank = case.labels // 53
    assert {0, 1} <= set(labels_rank[case.labels != IGNORE_INDEX].tolist())
    # Log-probs reach -2 x 50 here, where an fp32 ulp is 7.6e-6: the values bound of the other tests,
    # 1e-5 + 1e-6 x max|logit|, not a flat 1e-5 (which two ulps of rounding-order difference exceed).
    value_tol = 1e-5 + 1e-6 * 50.0
    for rank, got in enumerate(ranks):
        # Every rank returns the full log-probs and the full hidden gradient.
        assert (got.logprob - single.logprob).abs().max() <= value_tol, rank
        assert (got.grad_hidden - single.grad_hidden).abs().max() <= 1e-5 * single.grad_hidden.abs().max(), rank
        assert float(got.loss) == pytest.approx(float(single.loss), abs=value_tol)
        assert (got.num_tokens, got.num_correct) == (single.num_tokens, single.num_correct)
    grad_weight = torch.cat([got.grad_weight for got in ranks])
    assert (grad_weight - single.grad_weight).abs().max() <= 1e-5 * single.grad_weight.abs().max()
    assert_close(single, case)


def test_naive_without_a_group_matches_fp64(seed):
    case = make_case(seed, 15, 12, 33, torch.float64)
    logprob, is_top1 = naive_linear_logprob(case.hidden, case.weight, case.labels, ignore_index=IGNORE_INDEX)
    expected = reference(case)
    assert (logprob - expected.logprob).abs().max() <= 1e-12
    assert int(is_top1.sum()) == expected.num_correct
