"""Trees of speculative tokens for :func:`triformers.ops.tree_attention`: the choices that describe a tree and
``TreeAttnMetadata``, its attention bias and index tensors (``triformers.ops.tree_attention`` re-exports them)."""

from __future__ import annotations

import functools
import itertools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@functools.lru_cache
def construct_full_tree_choices(tree_depth: int, branching: int) -> list[tuple[int, ...]]:
    """The Medusa ``tree_choices`` of a full tree: ``tree_depth`` levels below the root, ``branching`` children
    per inner node (``construct_full_tree_choices(2, 2) == [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]``)."""
    return construct_tree_choices([branching] * tree_depth)


def construct_tree_choices(branching: list[int]) -> list[tuple[int, ...]]:
    """The ``tree_choices`` of a tree whose nodes at depth ``i`` (the root is depth 0) have ``branching[i]``
    children each: all paths of every length, level by level."""
    levels = (itertools.product(*(range(b) for b in branching[: i + 1])) for i in range(len(branching)))
    return [path for level in levels for path in level]


def get_full_tree_size(tree_depth: int, branching: int) -> int:
    """``sum(branching ** i for i < tree_depth)``: the nodes of a full tree of ``tree_depth`` levels, the root's
    included (``construct_full_tree_choices(d, b)`` has ``get_full_tree_size(d + 1, b) - 1`` choices)."""
    return sum(branching**i for i in range(tree_depth))


def _sorted_choices(tree_choices: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The choices as tuples sorted by ``(len, value)``; ValueError unless they form a tree."""
    choices = []
    for c in tree_choices:
        ok = isinstance(c, (tuple, list)) and len(c) > 0
        if not ok or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0 for x in c):
            raise ValueError(
                f"tree_choices holds {c!r}; each choice is a non-empty tuple of child indices >= 0, the path from "
                "the root to its node, e.g. (0, 2) for the root's first child's third child"
            )
        choices.append(tuple(int(x) for x in c))
    choices.sort(key=lambda c: (len(c), c))
    seen: set[tuple[int, ...]] = set()
    for c in choices:
        if c in seen:
            raise ValueError(f"tree_choices holds {c} twice; each node appears once")
        if len(c) > 1 and c[:-1] not in seen:
            raise ValueError(f"tree_choices holds {c} but not its parent {c[:-1]}; add every prefix of each path")
        seen.add(c)
    return choices


@dataclass
class TreeAttnMetadata:
    """A draft tree in the forms tree attention and its callers need (xFormers' fields and semantics).

    Nodes are numbered 0 (the root) to ``tree_size - 1``, node ``i + 1`` being ``tree_choices[i]`` once sorted by
    ``(len, value)`` (level by level). "Choice index" below is a node's number minus one.

    Attributes:
        tree_choices: the sorted choices.
        attention_bias: ``[tree_size, tree_size]``, 0 where node ``i`` may attend node ``j`` (itself, its
            ancestors, the root), -inf elsewhere: the ``spec_attn_bias`` of :func:`tree_attention`.
        tree_indices: ``[tree_size]`` int64, each node's draft token: ``1 + c`` plus, for each shallower level,
            one more than its largest child index ``c`` (the root's is 0).
        retrieval_indices: ``[num_leaves, depth + 1]`` int64, each leaf's path of nodes from the root, padded with
            -1 (rows in the order of the leaves' numbers; the root alone is a leaf of a tree without choices).
        path_lengths: the paths' lengths.
        tree_seq_position_ids: ``[tree_size]`` int32, each node's depth (position in its path).
        parent_node_indices: ``[tree_size - 1]`` int64, the parent's node number of each non-root node.
        child_node_indices: ``[tree_size, max_children]`` int64, each node's children as choice indices, padded by
            repeating the last one; rows of leaves are 0.
        num_children_per_node: ``[tree_size]`` int64.
        candidate_idx: ``[tree_size - 1]`` int64, each non-root node's rank among its siblings.
        num_nodes_per_level: ``[depth + 1]`` int64 (the root's level included); ``num_nodes_per_level_cpu``
            the same on the CPU.
        num_children_per_node_at_level: per level, ``num_children_per_node`` of its nodes (views);
            ``num_children_per_node_at_level_cpu`` the same on the CPU.
        subtree_sizes: number of nodes down to each level (cumulative ``num_nodes_per_level``).

    Example: ``[(0,), (0, 0), (0, 1), (0, 2), (1,), (1, 0), (1, 1), (1, 2), (2,), (2, 0), (2, 1), (2, 2)]`` is a
    root with children 1-3, each with three children (4-6, 7-9, 10-12): ``tree_indices = [0, 1, 2, 3, 4, 5, 6,
    4, 5, 6, 4, 5, 6]``, ``tree_seq_position_ids = [0, 1, 1, 1, 2, ..., 2]``, ``child_node_indices[0:4] =
    [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]``, ``candidate_idx = [0, 1, 2] * 4``, ``num_nodes_per_level
    = [1, 3, 9]``, ``subtree_sizes = [1, 4, 13]``, paths ``[0, 1, 4], [0, 1, 5], ..., [0, 3, 12]``.
    """

    tree_choices: Sequence[tuple[int, ...]]
    attention_bias: torch.Tensor
    tree_indices: torch.Tensor
    retrieval_indices: torch.Tensor
    path_lengths: list[int]
    tree_seq_position_ids: torch.Tensor
    parent_node_indices: torch.Tensor
    child_node_indices: torch.Tensor
    num_children_per_node: torch.Tensor
    candidate_idx: torch.Tensor
    num_nodes_per_level: torch.Tensor
    num_nodes_per_level_cpu: torch.Tensor
    num_children_per_node_at_level: list[torch.Tensor]
    num_children_per_node_at_level_cpu: list[torch.Tensor]
    subtree_sizes: list[int]

    @classmethod
    def from_tree_choices_cached(
        cls,
        tree_choices: tuple[tuple[int, ...], ...],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> TreeAttnMetadata:
        """:meth:`from_tree_choices`, built once per ``(tree_choices, dtype, device)`` (hashable arguments); the
        same object is returned each time, so do not modify its tensors."""
        return _cached_metadata(cls, tree_choices, dtype, device)

    @classmethod
    def from_tree_choices(
        cls,
        tree_choices: Sequence[tuple[int, ...]],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> TreeAttnMetadata:
        """The metadata of a tree given as Medusa ``tree_choices`` (one host-side construction).

        Args:
            tree_choices: one tuple per node but the root: the child indices along the path from the root, e.g.
                ``(1, 0)`` is the first child of the root's second child. Any order; every prefix of a path must
                be a node too.
            dtype: of ``attention_bias`` (default: torch's default dtype); use the query's.
            device: of the tensors (default: the CPU; the ``*_cpu`` fields stay there).

        Raises:
            ValueError: choices that are not a tree (a missing parent, a duplicate, an empty or negative path).
        """
        choices = _sorted_choices(tree_choices)
        number = {c: i for i, c in enumerate([(), *choices])}
        size, depth = len(number), max((len(c) for c in choices), default=0)
        parents = [number[c[:-1]] for c in choices]
        children: list[list[int]] = [[] for _ in range(size)]
        candidates = []
        for i, p in enumerate(parents):
            candidates.append(len(children[p]))
            children[p].append(i)
        per_level = [1] + [sum(len(c) == d for c in choices) for d in range(1, depth + 1)]
        # level d's draft tokens follow those of shallower levels, each level as wide as its largest child index
        offsets = [0, 1]
        for d in range(1, depth):
            offsets.append(offsets[-1] + 1 + max(c[-1] for c in choices if len(c) == d))
        paths = {number[c]: [number[c[:k]] for k in range(len(c) + 1)] for c in [(), *choices]}
        leaves = [n for n in range(size) if not children[n]]
        width = max(1, *(len(ch) for ch in children))
        allowed = torch.zeros(size, size, dtype=torch.bool)
        for n, path in paths.items():
            allowed[n, path] = True

        def tensor(values, dtype=torch.int64):
            return torch.tensor(values, dtype=dtype, device=device)

        num_children = tensor([len(ch) for ch in children])
        num_nodes_per_level = tensor(per_level)
        subtree_sizes = list(itertools.accumulate(per_level))
        at_level = [num_children[s - n : s] for s, n in zip(subtree_sizes, per_level)]
        return cls(
            tree_choices=choices,
            attention_bias=torch.zeros(size, size, dtype=dtype, device=device).masked_fill_(
                ~allowed.to(device), float("-inf")
            ),
            tree_indices=tensor([0] + [offsets[len(c)] + c[-1] for c in choices]),
            retrieval_indices=tensor([paths[n] + [-1] * (depth + 1 - len(paths[n])) for n in leaves]),
            path_lengths=[len(paths[n]) for n in leaves],
            tree_seq_position_ids=tensor([0] + [len(c) for c in choices], torch.int32),
            parent_node_indices=tensor(parents),
            child_node_indices=tensor([ch + ch[-1:] * (width - len(ch)) if ch else [0] * width for ch in children]),
            num_children_per_node=num_children,
            candidate_idx=tensor(candidates),
            num_nodes_per_level=num_nodes_per_level,
            num_nodes_per_level_cpu=num_nodes_per_level.cpu(),
            num_children_per_node_at_level=at_level,
            num_children_per_node_at_level_cpu=[x.cpu() for x in at_level],
            subtree_sizes=subtree_sizes,
        )


@functools.lru_cache
def _cached_metadata(cls, tree_choices, dtype, device) -> TreeAttnMetadata:
    return cls.from_tree_choices(tree_choices, dtype, device)
