"""The Triton kernels compiled ahead of time for Hopper (sm_90a), on any machine: no GPU needed.

    python -m pivot_mega.kernels.hopper          # the resource table, markdown

Each kernel of ``triton_linear_logprob`` is compiled at the launch configuration its CUDA path picks
for each dtype (``cuda_launch_config``), and the PTX goes through the ``ptxas`` inside the Triton
wheel (``-v -arch=sm_90a``), which reports registers and spills. Shared memory is what Triton's
compiled kernel asks for at launch. A bf16 / fp16 kernel should multiply with Hopper's wgmma.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import torch

from . import triton_linear_logprob as kernels

H100_SHARED_PER_BLOCK = 227 * 1024  # bytes of shared memory one block may use on sm_90
POINTERS = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


@dataclasses.dataclass
class Compiled:
    kernel: str
    dtype: str
    tiles: str
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    wgmma: bool


def ptxas_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_all(dtypes=tuple(POINTERS)) -> list[Compiled]:
    """Every kernel at every dtype's CUDA launch configuration, compiled for sm_90a (a few seconds each)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = []
    for dtype in dtypes:
        cfg = kernels.cuda_launch_config(dtype)
        constants = kernels.kernel_constants(cfg, dtype)
        for kernel, signature in kernels.kernel_signatures(POINTERS[dtype]).items():
            consts = constants[kernel]
            source = ASTSource(kernel, {**signature, **{name: "constexpr" for name in consts}}, constexprs=consts)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            ptx = compiled.asm["ptx"]
            registers, spills = _ptxas(ptx, kernel.__name__)
            tiles = "x".join(str(v) for k, v in consts.items() if k.startswith("BLOCK"))
            out.append(Compiled(kernel.__name__, str(dtype).removeprefix("torch."), tiles, cfg.num_warps,
                                cfg.num_stages, registers, spills, int(compiled.metadata.shared),
                                "wgmma" in ptx))
    return out


def _ptxas(ptx: str, name: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) of ``name`` as ``ptxas -v -arch=sm_90a`` reports them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas_path(), "-v", "-arch=sm_90a", path, "-o", os.path.join(tmp, "out.cubin")],
                                capture_output=True, text=True)
    report = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed on {name} for sm_90a: {report.strip()[-2000:]}")
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if registers is None or spills is None:
        raise RuntimeError(f"ptxas printed no resource usage for {name}: {report.strip()[-2000:]}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


def markdown(rows: list[Compiled]) -> str:
    lines = ["| kernel | dtype | tiles | warps | stages | registers | spills (bytes) | shared memory | wgmma |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r.kernel}` | {r.dtype} | {r.tiles} | {r.num_warps} | {r.num_stages} | {r.registers} | "
                     f"{r.spill_bytes} | {r.shared_bytes / 1024:.0f} KB | {'yes' if r.wgmma else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(compile_all()))
