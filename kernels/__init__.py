"""Fused kernels (Triton on GPU, torch chunked path on CPU and as the reference)."""
