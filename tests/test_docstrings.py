"""The public functions' docstrings: torch's sections (``Shape:``, ``Examples::``) are there,
the shared CE math is filled in, and every example runs and prints what it says."""

import doctest

import pytest
import torch
import torch.nn.functional as F

import fused_ce

FUNCTIONS = [
    fused_ce.softmax_cross_entropy,
    fused_ce.sigmoid_binary_cross_entropy,
    fused_ce.linear_cross_entropy,
    fused_ce.linear_binary_cross_entropy_with_logits,
    fused_ce.linear_log_probs,
    fused_ce.linear_top_k,
]
MODULES = [
    fused_ce.nn.CrossEntropyLoss,
    fused_ce.nn.BCEWithLogitsLoss,
    fused_ce.nn.LinearCrossEntropyLoss,
    fused_ce.nn.LinearBCEWithLogitsLoss,
]


@pytest.mark.parametrize("function", FUNCTIONS + MODULES, ids=lambda f: f.__name__)
def test_docstring_sections_and_examples(function):
    doc = function.__doc__
    sections = ("Shape:", "Examples::") if function in MODULES else ("Args:", "Returns:")
    for section in ("Shape:", "Examples::", *sections):
        assert f"\n    {section}\n" in doc, section
    assert "{CE_MATH}" not in doc
    torch.manual_seed(0)
    finder = doctest.DocTestFinder()
    (test,) = finder.find(function, globs={"torch": torch, "F": F, "fused_ce": fused_ce})
    assert len(test.examples) >= 4
    test.name = function.__name__
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_ce_math_is_shared_by_both_cross_entropies():
    ce_doc, linear_doc = (
        fused_ce.softmax_cross_entropy.__doc__,
        fused_ce.linear_cross_entropy.__doc__,
    )
    from fused_ce._docs import CE_MATH

    assert CE_MATH in ce_doc and CE_MATH in linear_doc
