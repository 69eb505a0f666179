"""Pure ``@triton.jit`` kernels, one kernel family per file; no torch imports here."""
