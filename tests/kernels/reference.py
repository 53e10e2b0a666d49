"""Inputs, the fp64 reference and error measures for the linear log-prob tests.

Module-level functions only, so that spawned processes (the Triton interpreter pool, gloo ranks) can
run them.
"""

from __future__ import annotations

import dataclasses

import torch

IGNORE_INDEX = -100


@dataclasses.dataclass
class Case:
    hidden: torch.Tensor       # [N, H]
    weight: torch.Tensor       # [V, H], the whole vocabulary
    labels: torch.Tensor       # [N] int64, some rows IGNORE_INDEX
    grad_output: torch.Tensor  # [N] fp32, the upstream gradient of logprob


@dataclasses.dataclass
class Result:
    logprob: torch.Tensor      # [N]
    grad_hidden: torch.Tensor  # [N, H]
    grad_weight: torch.Tensor  # [V or V_local, H]
    loss: torch.Tensor         # [] mean NLL over label rows
    num_tokens: int
    num_correct: int


def make_case(seed: int, num_tokens: int, hidden_size: int, vocab: int, dtype=torch.float32, *,
              max_logit: float | None = None, ignored: int = 2) -> Case:
    """Random inputs with ``ignored`` rows (never the first or last) labelled IGNORE_INDEX.

    With ``max_logit`` the weight is scaled so that max |logit| equals it, the first row's label is
    its top logit and the last row's its bottom one (a log-prob near -2 * max_logit).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / hidden_size ** 0.5
    labels = torch.randint(0, vocab, (num_tokens,), generator=gen)
    if max_logit is not None:
        logits = hidden @ weight.T
        weight *= max_logit / logits.abs().max()
        labels[0], labels[-1] = logits[0].argmax(), logits[-1].argmin()
    middle = torch.randperm(max(num_tokens - 2, 0), generator=gen)[:ignored] + 1
    labels[middle] = IGNORE_INDEX
    grad_output = torch.randn(num_tokens, generator=gen)
    return Case(hidden.to(dtype), weight.to(dtype), labels, grad_output)


def reference(case: Case) -> Result:
    """``log_softmax(hidden @ weight.T)[labels]`` and its gradients, in fp64 from the same inputs."""
    hidden = case.hidden.double().requires_grad_()
    weight = case.weight.double().requires_grad_()
    has_label = case.labels != IGNORE_INDEX
    logits = hidden @ weight.T
    logprob = torch.log_softmax(logits, dim=-1).gather(1, case.labels.clamp(min=0)[:, None]).squeeze(1)
    logprob = torch.where(has_label, logprob, 0.0)
    (logprob * case.grad_output.double()).sum().backward()
    num_tokens = int(has_label.sum())
    correct = has_label & (logits.argmax(dim=1) == case.labels)
    return Result(logprob.detach(), hidden.grad, weight.grad, -logprob.detach().sum() / max(num_tokens, 1),
                  num_tokens, int(correct.sum()))


def run(case: Case, weight: torch.Tensor | None = None, **kwargs) -> Result:
    """``linear_logprob`` on the case (or on ``weight``, a vocab shard) with ``return_stats``; backward
    through ``sum(grad_output * logprob)``."""
    from pivot_mega.kernels.linear_logprob import linear_logprob

    hidden = case.hidden.clone().requires_grad_()
    weight = (case.weight if weight is None else weight).clone().requires_grad_()
    out = linear_logprob(hidden, weight, case.labels, ignore_index=IGNORE_INDEX, return_stats=True, **kwargs)
    (out.logprob * case.grad_output.to(out.logprob.dtype)).sum().backward()
    return Result(out.logprob.detach(), hidden.grad, weight.grad, out.loss.detach(), int(out.num_tokens),
                  int(out.num_correct))


def max_errors(got: Result, expected: Result) -> dict[str, float]:
    """Max absolute errors of log-probs and gradients, the gradients' relative to their max magnitude."""
    def rel(a, b):
        return float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30))

    return {"logprob": float((got.logprob.double() - expected.logprob).abs().max()),
            "grad_hidden": rel(got.grad_hidden, expected.grad_hidden),
            "grad_weight": rel(got.grad_weight, expected.grad_weight)}


def start_triton_interpreter() -> None:
    """Process-pool initializer: Triton's CPU interpreter, set before anything imports triton."""
    import os

    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)


def run_triton(case: Case, kwargs: dict) -> dict:
    """``run(case, impl="triton", **kwargs)`` as a dict (results crossing processes are unpickled
    with torch's weights-only rules); for a process started by start_triton_interpreter."""
    return dataclasses.asdict(run(case, impl="triton", **kwargs))


def tolerances(case: Case) -> dict[str, float]:
    """Bounds for :func:`max_errors` against the fp64 reference, from the inputs' dtype and logit scale.

    Log-probs are computed in fp32 from the given inputs, so their error is fp32 rounding of logits
    and log-sum-exp: ~1e-7 of the largest |logit| (1e-3 at 1e4), bounded here by 1e-6 of it plus 1e-5.
    A logit error e moves a softmax probability by at most e/4, so fp32 gradients get 1e-7 of the
    logit scale on top of 1e-5 (relative to the gradient's max). bf16 / fp16 gradients are rounded to
    their dtype (2^-9 / 2^-11 relative), partial sums too on the Triton path: about 5 of their ulps.
    """
    scale = float((case.hidden.double() @ case.weight.double().T).abs().max())
    grad = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[case.hidden.dtype] + 1e-7 * scale
    return {"logprob": 1e-5 + 1e-6 * scale, "grad_hidden": grad, "grad_weight": grad}


def assert_close(got: Result, case: Case, expected: Result | None = None) -> dict[str, float]:
    """Checks values, gradients, loss and counts against the fp64 reference; returns the errors."""
    expected = expected or reference(case)
    errors, bounds = max_errors(got, expected), tolerances(case)
    assert all(errors[k] <= bounds[k] for k in errors), f"errors {errors} over bounds {bounds}"
    assert abs(float(got.loss) - float(expected.loss)) <= bounds["logprob"]
    assert (got.num_tokens, got.num_correct) == (expected.num_tokens, expected.num_correct)
    assert got.grad_hidden.dtype == case.hidden.dtype and got.grad_weight.dtype == case.weight.dtype
    return errors
