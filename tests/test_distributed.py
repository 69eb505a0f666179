"""fused_ce.distributed on real multi-process worlds: gloo on CPU, 2 and 3 ranks (3 gives
uneven class shards). Each test spawns one world whose ranks run a list of cases
(tests/_distributed_cases.py) and fails with every rank's failing cases:

* cross-entropy and the linear head, every option and reduction, ignore_index, all rows
  ignored, N-D and 1-D inputs, probability targets, argmax ties across ranks, sequence
  parallelism on and off: loss, stats and every gradient equal the single-process ones in
  float64, and bf16 stays within 2x torch's own error;
* DTensor inputs (logits sharded on the class dim, a Shard(0) head), evenly and unevenly split;
* row counts whose packed statistics are not 8-byte multiples, in every dtype; a rank that
  holds no classes (the single-process result);
* errors: raised on every rank alike, from the header every call exchanges first; a group of
  one rank; (a world of its own, 2 ranks) ranks whose arguments disagree (rows, dtypes,
  options, targets, class weights, token counts with sequence parallelism) or of which one
  rejects its arguments: the same error on every rank, naming the argument (and the rank);
* (2 ranks) DDP and FSDP2 (``fully_shard``) training of a small model whose head is
  ``fused_ce.nn.LinearCrossEntropyLoss`` ends with the parameters of one rank trained on the
  concatenated batches.
"""

from __future__ import annotations

import pytest
from _distributed_cases import spawn


@pytest.mark.parametrize(
    ("world", "cases"), [(2, "all"), (3, "vocab_parallel"), (2, "disagreement")]
)
def test_distributed_world(world, cases, tmp_path):
    failures = spawn(world, cases, str(tmp_path))
    assert not failures, f"{len(failures)} failing case(s):\n" + "\n".join(failures)
