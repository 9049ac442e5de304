"""Building blocks for running over several processes with ``torch.distributed``.

- :mod:`triformers.distributed.testing`: ``launch(world_size, fn, ...)`` and ``DistributedWorkers``, which run
  a function on N local processes, each a rank of a fresh process group (gloo on CPU, NCCL on GPUs), and
  turn any rank's failure into an exception in the caller instead of a hang.
- :mod:`triformers.distributed.p2p`: ``ring_step`` (one step of a ring of point-to-point transfers, any dtype
  over any backend) and ``ComputeStreams`` (compute overlapped with those transfers on CUDA and CPU).

The tensor/sequence-parallel operators live with the other operators in :mod:`triformers.ops`
(``differentiable_collectives``, ``sequence_parallel_fused_ops``, ``seqpar``, ``tiled_matmul``,
``modpar_layers``).

Context parallelism (a sequence sharded over the ranks):

- :func:`context_parallel_attention` (also ``triformers.ops.context_parallel_attention``): exact attention of
  each rank's shard over the whole sequence, by a ring of K/V blocks (:mod:`.ring`) or all-to-alls
  (:mod:`.ulysses`), with zigzag load balancing;
- :func:`shard_sequence`, :func:`gather_sequence`, :func:`shard_positions` (:mod:`.sharding`): a rank's tokens
  of a full tensor and back, differentiable, and their global positions;
- :func:`context_parallel` (:mod:`.module`): a model's attention calls made context-parallel.
"""

import triformers.ops  # noqa: F401  (first: the operators import modules of this package)
from triformers.distributed.context_parallel import context_parallel_attention
from triformers.distributed.module import ContextParallel, context_parallel
from triformers.distributed.sharding import gather_sequence, shard_positions, shard_sequence

__all__ = [
    "context_parallel_attention",
    "context_parallel",
    "ContextParallel",
    "shard_sequence",
    "gather_sequence",
    "shard_positions",
]
