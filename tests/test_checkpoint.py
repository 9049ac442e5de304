"""triformers.checkpoint: selective activation checkpointing keeps exactly what its policy names.

Outputs and every gradient equal plain eager (the recomputation runs the same kernels on the same inputs, so
bitwise); the operators recomputed in the backward are counted with a dispatch mode; the activation memory kept
between forward and backward is measured by tracking which outputs' storages are still alive.
"""

import collections
import gc
import itertools
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import triformers
import triformers.ops as xops
from triformers.checkpoint import (
    DEFAULT_ALLOW_LIST,
    SelectiveCheckpointWrapper,
    _optimize_runtime_with_given_memory,
    checkpoint,
    get_optimal_checkpoint_policy,
    list_operators,
    selective_checkpoint_wrapper,
)
from triformers.distributed.testing import launch
from triformers.ops import fmha

FLASH = "triformers.flash_fwd.default"
OPS = {"triton": fmha.TritonFlashAttentionOp, "sdpa": fmha.MemoryEfficientAttentionSdpaOp}
SDPA_CPU = "aten._scaled_dot_product_flash_attention_for_cpu.default"


class Block(torch.nn.Module):
    """Pre-norm attention block: LayerNorm, QKV projection, attention, output projection, GELU, dropout."""

    def __init__(self, dim=16, heads=2, op=None, p=0.0, attn_p=0.0):
        super().__init__()
        self.heads, self.op, self.attn_p = heads, op, attn_p
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.drop = torch.nn.Dropout(p)

    def forward(self, x):
        b, m, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, m, 3, self.heads, d // self.heads).unbind(2)
        a = xops.memory_efficient_attention(q, k, v, p=self.attn_p, op=self.op)
        return x + self.drop(F.gelu(self.proj(a.reshape(b, m, d))))


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


class Retained(TorchDispatchMode):
    """Weak references to the storages of every operator output; what is alive later is what something keeps."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.refs.append((StorageWeakRef(s), s.data_ptr(), s.nbytes()))
        return out

    def alive_bytes(self) -> int:
        gc.collect()  # what only reference cycles hold is not kept
        return sum({ptr: n for ref, ptr, n in self.refs if not ref.expired()}.values())


def run(block, x, policy, seed=0, count=False):
    """(output, input and parameter gradients, ops dispatched during the backward); policy "eager": no checkpoint."""
    torch.manual_seed(seed)
    y = block(x) if policy == "eager" else checkpoint(block, x, policy_fn=policy)
    mode = CountOps()
    with mode:
        y.backward(torch.ones_like(y) / y.numel() + y.detach() * 0.01)
    grads = [x.grad] + [p.grad for p in block.parameters()]
    x.grad = None
    block.zero_grad(set_to_none=True)
    return y.detach(), grads, mode.counts


# Triton's interpreter runs our attention kernels ~100x slower than torch's CPU SDPA: small inputs for them
SHAPES = {"triton": (1, 5, 16), "sdpa": (2, 17, 16)}


def make(op="sdpa", p=0.0, attn_p=0.0):
    block = Block(op=OPS[op], p=p, attn_p=attn_p)
    x = torch.randn(*SHAPES[op], requires_grad=True)
    return block, x


def assert_same(a, b):
    (ya, ga, _), (yb, gb, _) = a, b
    torch.testing.assert_close(ya, yb, atol=0, rtol=0)
    for g1, g2 in zip(ga, gb):
        torch.testing.assert_close(g1, g2, atol=0, rtol=0)


def save_all(ctx, func, *args, **kwargs):
    return True


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("policy", ["default", "recompute-all", "attention", "gelu-packet", "all", "callable-enum"])
def test_matches_eager(op, policy):
    policies = {
        "default": None,
        "recompute-all": [],
        "attention": [FLASH, SDPA_CPU],
        "gelu-packet": [torch.ops.aten.gelu],
        "all": save_all,
        "callable-enum": lambda ctx, func, *a, **k: (
            torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
            if str(func) == "aten.addmm.default"
            else torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE
        ),
    }
    block, x = make(op, p=0.25, attn_p=0.0 if op == "sdpa" else 0.2)
    assert_same(run(block, x, policies[policy]), run(block, x, "eager"))


@pytest.mark.parametrize("op", list(OPS))
def test_recomputes_what_is_not_saved(op):
    """Saving attention recomputes the LayerNorm and the projections but not attention; the default list saves
    the matmuls too; an empty list recomputes everything the backward needs (recomputation stops after the last
    output the backward reads: the GELU, whose gradient needs only its input, is never recomputed)."""
    block, x = make(op)
    attn = FLASH if op == "triton" else SDPA_CPU
    _, _, eager = run(block, x, "eager")
    _, _, save_attn = run(block, x, [attn])
    _, _, default = run(block, x, None)
    _, _, nothing = run(block, x, [])
    norm = "aten.native_layer_norm.default"
    assert (eager[attn], eager["aten.addmm.default"], eager[norm]) == (0, 0, 0)
    assert (save_attn[attn], save_attn["aten.addmm.default"], save_attn[norm]) == (0, 2, 1)
    assert (default[attn], default["aten.addmm.default"], default[norm]) == (0, 0, 1)
    assert (nothing[attn], nothing["aten.addmm.default"], nothing[norm]) == (1, 2, 1)


def test_memory_kept_between_forward_and_backward():
    """Keeping attention keeps exactly its output and log-sum-exp on top of full recomputation; keeping the
    matmuls keeps more; no checkpointing keeps the most."""
    block, x = make("triton")
    kept = {}
    for name, policy in [("nothing", []), ("attention", [FLASH]), ("default", None), ("eager", "eager")]:
        mode = Retained()
        with mode:
            y = block(x) if policy == "eager" else checkpoint(block, x, policy_fn=policy)
        kept[name] = mode.alive_bytes()
        y.sum().backward()
        del y
    (b, m, _), h, k = x.shape, 2, 8
    out_and_lse = b * m * h * k * 4 + b * h * m * 4  # float32 [B, M, H, K] and [B, H, M]
    assert kept["attention"] - kept["nothing"] == out_and_lse
    assert kept["nothing"] < kept["attention"] < kept["default"] < kept["eager"]


def test_no_grad():
    block, x = make("triton", p=0.25)
    with torch.no_grad():
        torch.manual_seed(1)
        y = checkpoint(block, x, policy_fn=[FLASH])
        torch.manual_seed(1)
        torch.testing.assert_close(y, block(x), atol=0, rtol=0)


def test_list_operators():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3), torch.nn.ReLU())
    ops = [str(op) for op in list_operators(mlp, torch.randn(3, 4))]
    assert [o for o in ops if o not in ("aten.t.default", "aten.detach.default")] == [
        "aten.addmm.default",
        "aten.relu.default",
    ] * 2
    block, x = make("triton")
    assert [str(op) for op in list_operators(block, x)].count(FLASH) == 1  # our attention: one op, by name


def test_default_allow_list_names_real_ops():
    import triformers.ops.seqpar  # noqa: F401 (registers the sequence-parallel custom ops)

    for name in DEFAULT_ALLOW_LIST:
        ns, op, overload = name.split(".")
        assert getattr(getattr(getattr(torch.ops, ns), op), overload) is not None


def test_top_level_exports():
    assert triformers.checkpoint is checkpoint and triformers.list_operators is list_operators
    assert triformers.selective_checkpoint_wrapper is selective_checkpoint_wrapper
    assert triformers.get_optimal_checkpoint_policy is get_optimal_checkpoint_policy


# ------------------------------------------------------------------------------------------------------------
# The optimal policy
# ------------------------------------------------------------------------------------------------------------


def brute_force(memory, runtimes, max_memory, views, inplace, random_ops, force_store_random):
    """Best runtime kept over every 0/1 assignment satisfying the constraints (None if none does)."""
    best = None
    for x in itertools.product([0, 1], repeat=len(memory)):
        if sum(m * xi for m, xi in zip(memory, x)) > max_memory + 1e-9:
            continue
        if any(x[i] for i in views) or any(x[i] != int(force_store_random) for i in random_ops):
            continue
        if any((x[op] != 1) if op == parent else (x[op] != x[parent]) for op, parent in inplace):
            continue
        value = sum(r * xi for r, xi in zip(runtimes, x))
        best = value if best is None else max(best, value)
    return best


@pytest.mark.parametrize("budget", [0.0, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_optimizer_matches_brute_force(seed, budget):
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(seed)
    n = 8
    memory = torch.randint(1, 100, (n,), generator=g).double()
    runtimes = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    views, inplace, random_ops = [1], [(4, 3), (6, 6)], [5]
    memory[1] = 0
    max_memory = budget * memory.sum().item()
    best = brute_force(memory.tolist(), runtimes.tolist(), max_memory, views, inplace, random_ops, False)
    if best is None:
        with pytest.raises(ValueError, match="no checkpoint policy fits"):
            _optimize_runtime_with_given_memory(memory, runtimes, max_memory, views, inplace, random_ops, False)
        return
    x = _optimize_runtime_with_given_memory(memory, runtimes, max_memory, views, inplace, random_ops, False)
    assert set(x.tolist()) <= {0.0, 1.0}
    assert (memory * x).sum() <= max_memory + 1e-9
    torch.testing.assert_close((runtimes * x).sum().item(), best)


def test_optimizer_infeasible():
    pytest.importorskip("scipy")
    one = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"no checkpoint policy fits max_memory=0 MiB.*raise memory_budget"):
        _optimize_runtime_with_given_memory(one, one, 0.0, [], [], [0], True)


@pytest.mark.parametrize("budget", [0.0, 0.5, 1.0])
def test_optimal_policy_matches_eager(budget):
    pytest.importorskip("scipy")
    block, x = make("sdpa", p=0.25)
    policy = get_optimal_checkpoint_policy(block, x, memory_budget=budget)
    assert_same(run(block, x, policy), run(block, x, "eager"))
    _, _, counts = run(block, x, policy)
    norm = "aten.native_layer_norm.default"
    if budget == 1.0:  # everything fits: only views and random ops are recomputed
        assert counts[norm] == counts["aten.addmm.default"] == counts[SDPA_CPU] == 0
    if budget == 0.0:  # nothing that takes memory is kept
        assert counts[norm] == 1 and counts["aten.addmm.default"] == 2 and counts[SDPA_CPU] == 1


def test_optimal_policy_errors(monkeypatch):
    pytest.importorskip("scipy")
    block, x = make("sdpa")
    with pytest.raises(ValueError, match=r"memory_budget must be between 0 and 1, got memory_budget=1.5"):
        get_optimal_checkpoint_policy(block, x, memory_budget=1.5)
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # as if scipy were not installed
    with pytest.raises(RuntimeError, match=r"pip install scipy"):
        get_optimal_checkpoint_policy(block, x, memory_budget=0.5)


def test_policy_errors():
    block, x = make("sdpa")
    with pytest.raises(ValueError, match=r"policy_fn must be None, a list of operators or a callable"):
        checkpoint(block, x, policy_fn="aten.mm.default")
    with pytest.raises(ValueError, match=r"list entries must be operators .* got 3 of type int"):
        checkpoint(block, x, policy_fn=[3])


# ------------------------------------------------------------------------------------------------------------
# The module wrapper
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["policy", "budget"])
def test_wrapper(kind):
    if kind == "budget":
        pytest.importorskip("scipy")
    block, x = make("sdpa", p=0.25)
    wrapped = selective_checkpoint_wrapper(
        block, **({"policy_fn": [SDPA_CPU]} if kind == "policy" else {"memory_budget": 0.5})
    )
    assert list(wrapped.state_dict()) == list(block.state_dict())
    with torch.no_grad():
        wrapped(x)
    if kind == "budget":
        assert wrapped.policy_fn is None  # computed at the first forward with gradients
    torch.manual_seed(0)
    y = wrapped(x)
    y.backward(torch.ones_like(y))
    got = [x.grad] + [p.grad for p in block.parameters()]
    x.grad = None
    block.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    y_ref = block(x)
    y_ref.backward(torch.ones_like(y_ref))
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    for g, r in zip(got, [x.grad] + [p.grad for p in block.parameters()]):
        torch.testing.assert_close(g, r, atol=0, rtol=0)


def test_wrapper_needs_one_of_budget_or_policy():
    block, _ = make("sdpa")
    with pytest.raises(ValueError, match=r"pass either policy_fn or memory_budget"):
        SelectiveCheckpointWrapper(block)
    with pytest.raises(ValueError, match=r"got memory_budget=0.5 and policy_fn=\[\]"):
        SelectiveCheckpointWrapper(block, memory_budget=0.5, policy_fn=[])


def _broadcast_policy(rank, world):
    """Each rank would choose differently (rank 1 is told to keep nothing); rank 0's choice wins everywhere."""
    import triformers.checkpoint as ckpt_module  # noqa: F401 (the module, not the function of the same name)

    module = sys.modules["triformers.checkpoint"]
    if rank == 1:
        real = module._optimize_runtime_with_given_memory
        module._optimize_runtime_with_given_memory = lambda memory, *a: torch.zeros_like(real(memory, *a))
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    wrapped = selective_checkpoint_wrapper(block, memory_budget=1.0)
    wrapped(torch.randn(4, 8, requires_grad=True)).sum().backward()
    return wrapped.policy_fn.decision


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_wrapper_broadcasts_the_policy():
    pytest.importorskip("scipy")
    decisions = launch(2, _broadcast_policy, timeout_s=120, start_method="fork" if sys.platform == "linux" else "spawn")
    assert decisions[0] == decisions[1] and any(decisions[0])


# ------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_memory_and_recompute(dtype):
    """Real sizes: activation memory kept by each policy (torch.cuda.memory_allocated) and the recomputed ops."""
    torch.manual_seed(0)
    dim, heads = 1024, 8
    block = Block(dim=dim, heads=heads, op=OPS["triton"]).cuda().to(dtype)
    x = torch.randn(4, 2048, dim, device="cuda", dtype=dtype, requires_grad=True)
    kept, outputs = {}, {}
    # one warm-up step first: one-time allocations that stay (cuBLAS workspaces) must not count as kept activations
    block(x).backward(torch.ones_like(x))
    x.grad = None
    block.zero_grad(set_to_none=True)
    for name, policy in [("nothing", []), ("attention", [FLASH]), ("default", None), ("eager", "eager")]:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = block(x) if policy == "eager" else checkpoint(block, x, policy_fn=policy)
        kept[name] = torch.cuda.memory_allocated() - before
        mode = CountOps()
        with mode:
            y.backward(torch.ones_like(y))
        outputs[name] = (y.detach(), x.grad.clone())
        x.grad = None
        block.zero_grad(set_to_none=True)
        if name == "attention":
            assert mode.counts[FLASH] == 0 and mode.counts["aten.native_layer_norm.default"] == 1
        del y
    # the forward is recomputed bit for bit; the backward accumulates dQ with atomics, in a varying order
    attn_bytes = 4 * 2048 * dim * x.element_size() + 4 * heads * 2048 * 4  # out + float32 lse
    assert kept["attention"] - kept["nothing"] >= attn_bytes, (kept, attn_bytes)
    assert kept["nothing"] < kept["attention"] < kept["default"] < kept["eager"], kept
    for name in ("nothing", "attention", "default"):
        torch.testing.assert_close(outputs[name][0], outputs["eager"][0], atol=0, rtol=0)
        torch.testing.assert_close(outputs[name][1], outputs["eager"][1], atol=2e-2, rtol=2e-2)
