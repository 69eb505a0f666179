"""The torch path: the kernels' math in plain PyTorch.

It is the CPU default and the second implementation the tests hold against the Triton kernels.
Like the kernels it saves per-row statistics and recomputes in backward, and it works through
the rows in chunks, so it never holds more than a bounded slice of N x C temporaries.
"""

# fp32 elements of temporaries per chunk (64 MiB): small enough to stay out of the way, large
# enough that per-chunk overhead is noise.
CHUNK_ELEMENTS = 1 << 24
