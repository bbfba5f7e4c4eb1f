"""Sparse MLP kernels for batch-1 decoding: a torch reference, numba CPU kernels and Triton kernels.

May import: nothing else from dyninfer (the lowest layer besides `core`, which it does not need).
"""
