"""Column- and row-parallel linear layers (Megatron-LM's tensor parallelism; xFormers' API and its rules).

A tensor-parallel MLP is ``RowParallelLinear(act(ColumnParallelLinear(x)))``: the column layer holds
``out/W`` rows of each weight (its outputs are the matching ``out/W`` features), the row layer ``in/W``
columns of its weight (its input is those features) and sums the partial products over the W ranks. With
``sequence_parallel=True`` the input of the column layer and the output of the row layer are sequence shards
(dim 0) and the collectives are the all-gather / reduce-scatter of :mod:`triformers.ops.seqpar`;
otherwise every rank holds the full input and the collectives are the all-reduces of
:mod:`triformers.ops.differentiable_collectives`.

As in xFormers, the defaults are traps that must be overridden explicitly: these layers have no bias
(``bias=False`` required), the column layer never gathers its output (``gather_output=False``) and takes a list
of output sizes (several weights sharing one input, e.g. the two halves of SwiGLU), and the row layer's input
is always parallel (``input_is_parallel=True``).

Initialisation matches FairScale's (hence xFormers'): each rank initialises the full, unpartitioned weight with
``init_method`` and keeps the strided slice ``full[rank::W]`` (rows for the column layer, columns for the row
layer). With the same random state on every rank, the ranks thus hold disjoint slices of one matrix, whatever W.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from triformers.ops.differentiable_collectives import copy_to_model_parallel_region, reduce_from_model_parallel_region
from triformers.ops.seqpar import sequence_parallel_leading_matmul, sequence_parallel_trailing_matmul

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]


def _init_2d_weight(
    weight: torch.Tensor,
    init_method: Callable[[torch.Tensor], torch.Tensor],
    process_group: ProcessGroup,
    partition_dim: int,
) -> None:
    """Fill ``weight`` with this rank's strided slice of a full weight initialised by ``init_method``."""
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    rows, cols = weight.shape
    if partition_dim == 0:
        full = weight.new_empty(rows * world, cols)
        mine = full[rank::world, :]
    else:
        full = weight.new_empty(rows, cols * world)
        mine = full[:, rank::world]
    with torch.no_grad():
        init_method(full)
        weight.copy_(mine)


def _require(cls: str, ok: bool, arg: str, value: object, needed: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{cls} requires {arg}={needed} ({why}), got {arg}={value!r}; pass {arg}={needed}")


class ColumnParallelLinear(torch.nn.Module):
    """``[x @ w.T for w in weights]`` with each weight's output features split over the ranks.

    Args:
        in_features: input features (every rank sees all of them).
        out_features: list of the full output sizes, one weight each, each a multiple of the group's size W.
        process_group: the tensor-parallel group.
        bias: must be False.
        gather_output: must be False (the outputs stay split: ``out_features[i] / W`` features per rank).
        init_method: initialises the full ``[out_features[i], in_features]`` weight (in place).
        sequence_parallel: the input is this rank's sequence shard ``[S/W, ..., in]``, all-gathered inside.
        fuse_sequence_parallel: overlap that all-gather with the matmuls (``seqpar``'s ``fuse``).

    Shapes: ``[S, ..., in]`` (``[S/W, ..., in]`` with ``sequence_parallel``) -> ``[S, ..., out_features[i] / W]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: list[int],
        *,
        process_group: ProcessGroup,
        bias: bool = True,
        gather_output: bool = True,
        init_method: Callable[[torch.Tensor], torch.Tensor] = torch.nn.init.xavier_normal_,
        sequence_parallel: bool = False,
        fuse_sequence_parallel: bool = True,
    ) -> None:
        super().__init__()
        name = "ColumnParallelLinear"
        if not isinstance(out_features, list):
            raise TypeError(
                f"{name} requires out_features to be a list of ints (one weight each), got "
                f"out_features={out_features!r}; pass out_features=[{out_features!r}]"
            )
        _require(name, not bias, "bias", bias, "False", "it has no bias; add one after the layer if needed")
        _require(name, not gather_output, "gather_output", gather_output, "False", "outputs stay split over the ranks")
        world = dist.get_world_size(process_group)
        if not all(isinstance(d, int) and d > 0 and d % world == 0 for d in out_features):
            raise ValueError(
                f"{name}: every out_features entry must be a positive multiple of the group's size {world}, got "
                f"out_features={out_features}"
            )
        self.in_features = in_features
        self.global_out_features = out_features
        self.my_out_features = [d // world for d in out_features]
        self.sequence_parallel = sequence_parallel
        self.fuse_sequence_parallel = fuse_sequence_parallel
        self.process_group = process_group
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.empty(d, in_features)) for d in self.my_out_features]
        )
        for w in self.weights:
            _init_2d_weight(w, init_method, process_group, partition_dim=0)

    def forward(self, input_: torch.Tensor) -> list[torch.Tensor]:
        if self.sequence_parallel:
            return sequence_parallel_leading_matmul(
                input_,
                [w.t() for w in self.weights],
                fuse=self.fuse_sequence_parallel,
                process_group=self.process_group,
            )
        input_ = copy_to_model_parallel_region(input_, self.process_group)
        return [torch.matmul(input_, w.t()) for w in self.weights]


class RowParallelLinear(torch.nn.Module):
    """``x @ w.T`` with the input features split over the ranks and the partial products summed.

    Args:
        in_features: the full input size, a multiple of the group's size W.
        out_features: output features (every rank gets all of them).
        process_group: the tensor-parallel group.
        bias: must be False.
        input_is_parallel: must be True (the input is this rank's ``in_features / W`` features).
        init_method: initialises the full ``[out_features, in_features]`` weight (in place).
        sequence_parallel: return this rank's sequence shard ``[S/W, ..., out]`` (a reduce-scatter instead of
            an all-reduce).
        fuse_sequence_parallel: overlap that reduce-scatter with the matmul (``seqpar``'s ``fuse``).

    Shapes: ``[S, ..., in_features / W]`` -> ``[S, ..., out]`` (``[S/W, ..., out]`` with ``sequence_parallel``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        process_group: ProcessGroup,
        bias: bool = True,
        input_is_parallel: bool = False,
        init_method: Callable[[torch.Tensor], torch.Tensor] = torch.nn.init.xavier_normal_,
        sequence_parallel: bool = False,
        fuse_sequence_parallel: bool = True,
    ) -> None:
        super().__init__()
        name = "RowParallelLinear"
        _require(name, not bias, "bias", bias, "False", "it has no bias; add one after the layer if needed")
        _require(
            name,
            input_is_parallel,
            "input_is_parallel",
            input_is_parallel,
            "True",
            "the input must already be split over the ranks, as a ColumnParallelLinear's output is",
        )
        world = dist.get_world_size(process_group)
        if not (isinstance(in_features, int) and in_features > 0 and in_features % world == 0):
            raise ValueError(
                f"{name}: in_features must be a positive multiple of the group's size {world}, got "
                f"in_features={in_features!r}"
            )
        self.global_in_features = in_features
        self.out_features = out_features
        self.my_in_features = in_features // world
        self.sequence_parallel = sequence_parallel
        self.fuse_sequence_parallel = fuse_sequence_parallel
        self.process_group = process_group
        self.weight = torch.nn.Parameter(torch.empty(out_features, self.my_in_features))
        _init_2d_weight(self.weight, init_method, process_group, partition_dim=1)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return sequence_parallel_trailing_matmul(
                input_, self.weight.t(), fuse=self.fuse_sequence_parallel, process_group=self.process_group
            )
        output = torch.matmul(input_, self.weight.t())
        return reduce_from_model_parallel_region(output, self.process_group)
