"""Every Triton kernel compiles for Hopper (sm_90a) at the launch configuration its CUDA path picks,
without a GPU: no spill, shared memory within an H100 block's 227 KB, bf16 / fp16 on wgmma."""

import pytest
import torch

from pivot_mega.kernels import hopper
from pivot_mega.kernels import triton_linear_logprob as kernels

triton = pytest.importorskip("triton")


def test_every_kernel_has_a_signature_to_compile_with():
    jitted = {name for name, value in vars(kernels).items() if isinstance(value, triton.runtime.JITFunction)
              and name.endswith("_kernel")}
    assert jitted == {k.__name__ for k in kernels.kernel_signatures("*bf16")}


@pytest.fixture(scope="module")
def compiled():
    return hopper.compile_all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_kernels_fit_hopper(compiled, dtype):
    rows = [r for r in compiled if r.dtype == dtype]
    assert len(rows) == 3
    for r in rows:
        assert r.spill_bytes == 0, r
        assert 0 < r.shared_bytes <= hopper.H100_SHARED_PER_BLOCK, r
        assert r.registers <= 255, r
        assert r.wgmma == (dtype != "float32"), r  # fp32 dots are ieee FMAs; half precision uses wgmma


def test_the_cuda_tiles_are_the_compiled_ones():
    cfg = kernels.cuda_launch_config(torch.bfloat16, multi_processors=132)
    constants = kernels.kernel_constants(cfg, torch.bfloat16)
    assert constants[kernels._matmul_accumulate_kernel]["BLOCK_N"] == cfg.matmul_block_n == 64
    assert constants[kernels._logit_stats_kernel]["BLOCK_V"] == cfg.block_v == 128
    assert cfg.min_programs == 264
