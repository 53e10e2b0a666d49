"""tools/gpu_check.py: the dry run end to end on CPU, and its checks failing when the code they check is wrong."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cpu_dry_run_runs_every_section(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] and not report["failures"]
    assert report["environment"]["mode"] == "cpu dry run"
    checks = report["checks"]
    by_section = {}
    for check in checks:
        by_section.setdefault(check["section"], []).append(check)
    assert set(by_section) == {"attention", "logprob", "dpo", "speed"}
    # Every backend this machine has, on both layouts, with gradients where the backend has a backward.
    attention = {c["name"]: c for c in by_section["attention"]}
    assert attention["sdpa, packed, fp32"]["ok"] and attention["sdpa, shared prefix, fp32"]["ok"]
    assert set(attention["sdpa, packed, fp32"]["figures"]) == {"out", "dq", "dk", "dv"}
    assert all(c["figures"]["out"] < 1e-5 for c in attention.values() if c["ok"] is not None)
    # The Triton kernel ran (in the interpreter) and agreed with fp64.
    logprob = {c["name"].split(",")[0]: c for c in by_section["logprob"]}
    assert logprob["triton"]["ok"] and logprob["chunked"]["ok"]
    assert logprob["triton"]["figures"]["grad_weight"] < 1e-5
    # Each DPO variant against its twin: the same step on one CPU gives the same loss.
    assert [c["name"] for c in by_section["dpo"]] == ["fp32 FSDP2, tiny", "fp32 FSDP2 + compile, tiny",
                                                      "float8 (torchao) + fp32 FSDP2, tiny"]
    for c in by_section["dpo"]:
        assert c["ok"] and c["figures"]["loss"] < 1e-5 and c["figures"]["cosine"] > 0.99999, c
        assert 0.3 < c["figures"]["twin_loss"] < 2
    speed = {c["name"]: c for c in by_section["speed"]}
    assert speed["matmul fp32"]["figures"]["tflops"] > 0
    assert {"bench_logprob naive fp32 N=64 H=32 V=512", "bench_logprob chunked fp32 N=64 H=32 V=512"} <= set(speed)
    benches = [c for name, c in speed.items() if name.startswith("pivot-mega bench dpo")]
    assert len(benches) == 2 and all(c["ok"] and c["figures"]["tokens_per_s"] > 0 for c in benches)
    markdown = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## attention", "## logprob", "## dpo", "## speed"):
        assert heading in markdown
    assert "FAIL" not in markdown


def test_without_cuda_it_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "no CUDA device here" in proc.stderr and "--cpu-dry-run" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_one_segment_at_a_time_oracle_matches_the_masked_reference(gpu_check, seed):
    """The oracle the backends are held to, against layers.reference_attention (a mask over the row)."""
    from pivot_mega.batch import PackedSeqs
    from pivot_mega.models.layers import reference_attention

    gen = torch.Generator().manual_seed(seed)
    lengths, prefix = [[6, 4, 3, 2], [9, 6]], [-1, 0, 0, -1, -1, -1]
    q = torch.randn(2, 15, 4, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 15, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    want = reference_attention(q, k, v, causal=True, packed=PackedSeqs.from_lengths(lengths, prefix=prefix))
    got = gpu_check.segment_attention(q, k, v, lengths, prefix)
    assert (got.double() - want).abs().max() < 1e-6


def test_attention_check_fails_a_wrong_backend(gpu_check, monkeypatch):
    from pivot_mega.models import layers

    def leaky(q, k, v, causal, packed):  # attends across segments: the mask forgotten
        return layers._sdpa(q, k, v, causal, None)

    monkeypatch.setitem(layers._BACKENDS, "sdpa", leaky)
    checks = {c.name: c for c in gpu_check.attention_checks(torch.device("cpu"), gpu_check.DRY, torch.float32)}
    assert checks["sdpa, packed, fp32"].ok is False and checks["sdpa, packed, fp32"].figures["out"] > 1e-2
    assert checks["sdpa, shared prefix, fp32"].ok is False


def test_logprob_check_fails_a_wrong_kernel(gpu_check, monkeypatch):
    import pivot_mega.kernels.linear_logprob  # noqa: F401 (the package exports a function of that name)

    module = sys.modules["pivot_mega.kernels.linear_logprob"]
    real = module.linear_logprob

    def off_by_temperature(hidden, weight, labels, **kwargs):  # logits scaled by 1.01
        return real(hidden * 1.01, weight, labels, **kwargs)

    monkeypatch.setattr(module, "linear_logprob", off_by_temperature)
    sizes = gpu_check.DRY
    checks = gpu_check.logprob_checks(torch.device("cpu"), sizes, (torch.float32,), impls=("chunked",))
    chunked = next(c for c in checks if c.name.startswith("chunked"))
    assert chunked.ok is False and chunked.figures["grad_hidden"] > 1e-3


def test_step_comparison_sees_a_wrong_gradient(gpu_check, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = {"a": torch.randn(64, generator=gen), "b": torch.randn(8, 8, generator=gen),
             "k_bias": torch.randn(8, generator=gen) * 1e-12}  # zero in exact arithmetic: not judged
    twin = {"loss": 0.69, "next_loss": 0.68, "grad_norm": 3.0, "grads": grads}
    same = gpu_check.compare_steps(dict(twin, grads={n: g.clone() for n, g in grads.items()}), twin)
    bounds = gpu_check.DPO_BOUND["bf16"] | {"next_loss": gpu_check.DPO_BOUND["bf16"]["loss"]}
    assert gpu_check.within(same, bounds) and same["near_zero_tensors"] == 1
    wrong = dict(twin, grads=dict(grads, b=-grads["b"]))  # one tensor's gradient reversed
    figures = gpu_check.compare_steps(wrong, twin)
    assert figures["worst_tensor"] == "b" and figures["worst_cosine"] < -0.99
    assert not gpu_check.within(figures, bounds)
    assert not gpu_check.within(dict(same, loss=float("nan")), bounds)
