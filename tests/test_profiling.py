"""FLOP accounting vs torch's FlopCounterMode on a real forward/backward; MFU arithmetic."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pivot_mega.kernels import linear_logprob
from pivot_mega.config import ConfigError, from_dict
from pivot_mega.profiling import (ProfileConfig, StepProfiler, ThroughputMeter, attended_pairs, forward_flops,
                                  nvtx_range, peak_tflops, step_flops)
from tests.parallel.test_equivalence import make_batch, split, tiny_config


def _run(model, mb, backward: bool) -> float:
    with FlopCounterMode(display=False) as counter:
        hidden = model(mb.input_ids, mb.images, packed=mb.packed, return_hidden=True)
        # The plain head (one matmul over labelled positions): exactly the model FLOPs of the head. The
        # fused kernel adds a recompute in backward, which is its own cost, measured by its benchmark.
        logprobs = linear_logprob(hidden.flatten(0, 1)[mb.targets.positions], model.language.head_weight,
                                  mb.targets.tokens, impl="naive")
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
    labels = len(mb.targets)
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


# ----------------------------------------------------------------------------------------------
# NVTX ranges, profile config, torch profiler traces


def test_nvtx_range_is_a_noop_on_cpu(monkeypatch):
    import pivot_mega.profiling as profiling

    assert not torch.cuda.is_available()
    pushed = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: pushed.append(name))
    with nvtx_range("forward") as first, nvtx_range("backward") as second:
        pass
    assert first is second  # one shared object: nothing allocated per call
    assert pushed == []
    # On CUDA the same call pushes and pops a range (the CUDA check is cached per process).
    monkeypatch.setattr(profiling, "_cuda_present", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: pushed.append("pop"))
    with nvtx_range("forward"):
        pushed.append("inside")
    with nvtx_range("off", enabled=False):
        pass
    assert pushed == ["forward", "inside", "pop"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(torch_steps=[3]), r"expected \[start, end\]"),
    (dict(nsys_steps=[5, 4]), "need 1 <= start <= end"),
    (dict(torch_steps=[0, 2]), "need 1 <= start <= end"),
    (dict(nsys_steps=["a", 2]), r"expected \[start, end\]"),
    (dict(nvtx="yes"), "expected true/false"),
])
def test_profile_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ProfileConfig(**kwargs).validate()


def test_profile_config_device_rules_and_yaml():
    config = from_dict(ProfileConfig, {"nsys_steps": [10, 12], "torch_steps": [3, 4]}, where="profile")
    assert config.validate(device_type="cuda") is config
    with pytest.raises(ConfigError, match="nsys_steps: Nsight Systems captures CUDA work and this run is on cpu"):
        config.validate(device_type="cpu")
    with pytest.raises(ConfigError, match="nsys_steps"):
        StepProfiler(config, "unused", "cpu")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ProfileConfig, {"nsys": [1, 2]}, where="profile")


def _train_steps(profiler: StepProfiler, steps: range, model, data) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in steps:
        profiler.step_begin(step)
        with profiler.range("forward_backward"):
            model(data).square().mean().backward()
        with profiler.range("optimizer"):
            optimizer.step()
            optimizer.zero_grad()
        profiler.step_end(step)


def test_torch_steps_write_a_chrome_trace_on_cpu(tmp_path):
    model, data = torch.nn.Linear(16, 16), torch.randn(8, 16)
    profiler = StepProfiler(ProfileConfig(torch_steps=[3, 4]), tmp_path, "cpu", rank=1)
    _train_steps(profiler, range(1, 7), model, data)
    profiler.close()
    path = tmp_path / "profile" / "torch_trace_rank1_steps3-4.json"
    assert profiler.trace_paths == [path]
    trace = json.loads(path.read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"step_3", "step_4", "forward_backward", "optimizer"} <= names
    assert not {"step_2", "step_5"} & names
    assert any(name and name.startswith("aten::addmm") for name in names)  # the ops inside the steps


def test_run_ending_inside_the_window_still_writes_it(tmp_path):
    model, data = torch.nn.Linear(4, 4), torch.randn(2, 4)
    profiler = StepProfiler(ProfileConfig(torch_steps=[2, 10]), tmp_path, "cpu")
    _train_steps(profiler, range(1, 4), model, data)  # stopped (a signal) at step 3
    profiler.close()
    trace = json.loads((tmp_path / "profile" / "torch_trace_rank0_steps2-10.json").read_text())
    assert {"step_2", "step_3"} <= {event.get("name") for event in trace["traceEvents"]}


def test_profile_nsys_script_wraps_the_trainer(tmp_path):
    """tools/profile_nsys.sh with a stand-in nsys that records its arguments."""
    fake = tmp_path / "nsys"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    env = dict(os.environ, NSYS=str(fake), ARGS_OUT=str(tmp_path / "args"), NSYS_OUT=str(tmp_path / "rep" / "x"),
               LAUNCHER="torchrun --nproc-per-node 8 --no-python")
    script = Path(__file__).resolve().parents[1] / "tools" / "profile_nsys.sh"
    result = subprocess.run([str(script), "run.yaml", "3", "5", "train.max_steps=6"], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[0] == "profile"
    for option in ("--capture-range=cudaProfilerApi", "--capture-range-end=stop", "--trace=cuda,nvtx,osrt,cudnn,cublas",
                   "--cuda-memory-usage=true", f"--output={tmp_path / 'rep' / 'x'}"):
        assert option in args
    launch = args.index("torchrun")
    assert args[launch:] == ["torchrun", "--nproc-per-node", "8", "--no-python", "pivot-mega", "train", "run.yaml",
                             "--set", "profile.nsys_steps=[3,5]", "--set", "train.max_steps=6"]
    # The override the trainer receives is a valid profile section.
    from pivot_mega.config import apply_overrides

    section = apply_overrides({}, [args[-3]])["profile"]
    assert from_dict(ProfileConfig, section, where="profile").validate(device_type="cuda").nsys_steps == [3, 5]
    bad = subprocess.run([str(script), "run.yaml", "5", "3"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "1 <= START <= END" in bad.stderr


def test_nsys_window_brackets_its_steps_with_synchronised_start_and_stop(tmp_path, monkeypatch):
    """The CUDA branch, on CPU: torch's CUDA calls are stood in for and recorded in order. The capture
    starts on an idle GPU before step START's range opens, and stops after step END's range has
    closed and its work has finished, so the report holds exactly those steps."""
    import pivot_mega.profiling as profiling

    calls = []
    monkeypatch.setattr(profiling, "_cuda_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: calls.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: calls.append("stop"))
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append("pop"))
    profiler = StepProfiler(ProfileConfig(nsys_steps=[2, 3]), tmp_path, "cuda")
    for step in range(1, 5):
        profiler.step_begin(step)
        with profiler.range("forward_backward"):
            pass
        profiler.step_end(step)
    profiler.close()
    window = calls[calls.index("start") - 1:calls.index("stop") + 1]
    assert window == ["synchronize", "start", "step_2", "forward_backward", "pop", "pop",
                      "step_3", "forward_backward", "pop", "pop", "synchronize", "stop"]
    assert calls.count("start") == calls.count("stop") == 1 and calls[-4:] == ["step_4", "forward_backward", "pop",
                                                                                 "pop"]
