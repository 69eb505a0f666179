"""Launch helpers: allocate outputs, choose block sizes and grids, call the Triton kernels.

Imported lazily, on the first call that runs a Triton kernel, so that ``import fused_ce``
works without Triton and compiles nothing.
"""
