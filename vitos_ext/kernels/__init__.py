"""Triton kernels of vitos_ext. The modules here import triton; vitos_ext.ops imports them only when it is installed."""
