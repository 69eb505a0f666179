"""Integrations of fused_ce with other libraries, each importable only where that library is.

* :mod:`fused_ce.integrations.transformers`: one call swaps the fused linear cross-entropy into
  a Hugging Face causal LM's training loss (extra ``hf``).
"""
