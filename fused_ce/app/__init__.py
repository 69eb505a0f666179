"""The training app behind the ``fused-ce`` console script: the lecture's workloads
(:mod:`.data`), training and prediction (:mod:`.train`), plots (:mod:`.plots`), the
correctness check (:mod:`.check`) and the command line (:mod:`.cli`).

It uses the library only through its public API; nothing in the library imports it.
"""
