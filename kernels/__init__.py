"""Fused kernels (Triton on GPU, torch chunked path on CPU and as the reference)."""

from .linear_logprob import KernelUnavailableError, LinearLogprobOutput, linear_logprob

__all__ = ["KernelUnavailableError", "LinearLogprobOutput", "linear_logprob"]
