"""Triton kernels for the CUDA inference fast path (each with a PyTorch fallback)."""
