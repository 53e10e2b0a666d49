"""``pivot-mega convert`` as a user runs it: a subprocess, exit codes, messages."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pivot_mega.cli import build_parser
from pivot_mega.models import VisionLanguageModel
from tests.hf_models import CASES, make_llava, make_qwen2, make_siglip, mllm_inputs, rel_err


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pivot_mega.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_convert_round_trip_from_the_command_line(tmp_path, seed):
    case = CASES[0]
    hf = make_llava(case, seed)
    hf.save_pretrained(tmp_path / "llava")
    done = _cli("convert", "import-hf", "--llava", tmp_path / "llava", "--out", tmp_path / "ckpt",
                "--dtype", "bf16", "--max-shard-size", "30KB")
    assert done.returncode == 0, done.stderr
    assert "select_layer -2" in done.stdout and f"image token {case.image_token_id}" in done.stdout
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    model = VisionLanguageModel.from_checkpoint(tmp_path / "ckpt")
    assert model.language.embed_tokens.weight.dtype == torch.bfloat16

    for fmt in ("llava", "siglip"):
        done = _cli("convert", "export-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / fmt, "--format", fmt)
        assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "siglip" / "config.json").read_text())["architectures"] == ["SiglipVisionModel"]
    ids, pixels = mllm_inputs(case, seed)
    with torch.no_grad():
        # Round HF's parameters the way the conversion did (not its buffers: rounding RoPE's
        # inv_freq buffer would change HF's model, not the weights).
        for param in hf.parameters():
            param.copy_(param.to(torch.bfloat16).float())
        err = rel_err(model.float()(ids, pixels), hf(input_ids=ids, pixel_values=pixels).logits)
    assert err <= 1e-5


def test_vision_plus_llm_from_the_command_line(tmp_path, seed):
    case = CASES[1]
    make_siglip(case, seed).save_pretrained(tmp_path / "siglip")
    make_qwen2(case, seed).save_pretrained(tmp_path / "qwen")
    done = _cli("convert", "import-hf", "--vision", tmp_path / "siglip", "--llm", tmp_path / "qwen",
                "--image-token-id", case.image_token_id, "--select-layer", -1, "--out", tmp_path / "ckpt")
    assert done.returncode == 0, done.stderr
    assert "select_layer -1" in done.stdout


def test_errors_exit_2_with_the_reason(tmp_path):
    (tmp_path / "qwen").mkdir()
    done = _cli("convert", "import-hf", "--vision", tmp_path / "qwen", "--llm", tmp_path / "qwen",
                "--out", tmp_path / "ckpt")
    assert done.returncode == 2
    assert f"{tmp_path / 'qwen'}: no config.json" in done.stderr
    assert "Traceback" not in done.stderr
    done = _cli("convert", "export-hf", "--ckpt", tmp_path / "missing", "--out", tmp_path / "x")
    assert done.returncode == 2 and "not a pivot_mega checkpoint" in done.stderr


def test_each_command_runs_from_the_module_next_to_its_code():
    parser, runners = build_parser()
    assert {name: run.__module__ for name, run in runners.items()} == {
        "convert": "pivot_mega.convert.commands", "transplant": "pivot_mega.convert.commands",
        "data": "pivot_mega.data.commands", "train": "pivot_mega.training.commands",
        "bench": "pivot_mega.training.commands", "plan": "pivot_mega.training.commands", "eval": "pivot_mega.eval.commands", "demo": "pivot_mega.demo"}
    # The order `pivot-mega --help` lists them in.
    assert "{convert,data,train,bench,plan,eval,transplant,demo}" in parser.format_usage()


def test_expandable_segments_by_default_and_a_users_setting_kept():
    from pivot_mega.cli import default_cuda_alloc_conf

    environ = {}
    assert default_cuda_alloc_conf(environ) and environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        environ = {name: "max_split_size_mb:512"}
        assert not default_cuda_alloc_conf(environ) and environ == {name: "max_split_size_mb:512"}


# A command that reports the allocator settings torch parsed, run through the real entry point.
_ALLOCATOR_PROBE = """
import sys
import torch
from pivot_mega import cli

def register(sub):
    sub.add_parser("probe")
    return {"probe": lambda args: print(torch._C._accelerator_getAllocatorSettings())}

cli.REGISTRARS = (register,)
sys.exit(cli.main(["probe"]))
"""


@pytest.mark.parametrize("user, parsed", [
    ({}, "expandable_segments:True"),
    ({"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"}, "max_split_size_mb:512"),
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, "expandable_segments:False"),
])
def test_the_allocator_reads_the_setting_when_a_command_runs(user, parsed):
    """torch reads its allocator settings once, at the first allocation that needs them: the entry point
    sets the default after torch is imported but before any command runs, and torch still takes it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    done = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], env={**env, **user}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == parsed
