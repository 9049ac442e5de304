"""tree_attention on the GPU at the sizes of xFormers' test grid (H=8, D=128, Mk=8192, bf16; fp16 on a subset).

EAGLE's and Medusa's choice sets and full trees x B {1, 16} x G {1, 2} x square/rectangular x padded/paged
(pages of 256 keys in a random permutation), NaN in every unused cache row, random lengths, against the float64
dense reference of ``test_tree_attention.py``, with the operators select_prefix_op chooses; the sheet's
path-unrolled reference run through our operators; every gradient (bf16, fp16); int4/fp8 caches; a call without
host sync, captured in a CUDA graph and replayed with new lengths and queries. Nothing here times anything.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from triformers.ops import fmha
from triformers.ops import tree_attention as ta
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import quantize
from triformers.ops.fmha import triton_splitk as sk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

_CPU_TESTS = Path(__file__).with_name("test_tree_attention.py")
_spec = importlib.util.spec_from_file_location("_tree_attention_cpu_tests", _CPU_TESTS)
cpu = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cpu  # its dataclass resolves annotations through sys.modules
_spec.loader.exec_module(cpu)  # make_case, the float64 references, the CPU test's trees

DEV = "cuda"
H, D, MK, PAGE_SIZE = 8, 128, 8192, 256
DTYPE = torch.bfloat16  # fp16 in test_fp16_and_bmhk
# (atol, rtol) against float64: the parts are float32, the merged output is rounded once to the dtype (bf16:
# 2**-9 relative) and the kernels round P to it for P @ V; xFormers compares at (1e-2, 3e-3) against a bf16
# reference. Quantized caches: group-wise int4 also rounds K/V to the query dtype before the products.
TOL = {torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
TOL_QUANTIZED = (2e-2, 2e-2)
TOL_GRAD = {torch.bfloat16: (6e-2, 3e-2), torch.float16: (1e-2, 1e-2)}  # gradients come out in the input dtype

# Medusa's choice sets (FasterDecoding/Medusa, medusa/model/medusa_choices.py), 63 nodes below the root each.
# fmt: off
MC_SIM_7B_63 = [(0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0), (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0)]  # noqa: E501
VICUNA_7B_STAGE2 = [(0,), (0, 0), (1,), (0, 1), (0, 0, 0), (1, 0), (2,), (0, 2), (0, 0, 1), (0, 3), (3,), (0, 1, 0), (2, 0), (4,), (0, 0, 2), (0, 4), (1, 1), (1, 0, 0), (0, 0, 0, 0), (5,), (0, 0, 3), (0, 5), (0, 2, 0), (3, 0), (0, 1, 1), (0, 6), (6,), (0, 7), (0, 0, 4), (4, 0), (1, 2), (0, 8), (7,), (0, 3, 0), (0, 0, 0, 1), (0, 0, 5), (2, 1), (0, 0, 6), (1, 0, 1), (0, 0, 1, 0), (2, 0, 0), (5, 0), (0, 9), (0, 1, 2), (8,), (0, 4, 0), (0, 2, 1), (1, 3), (0, 0, 7), (0, 0, 0, 2), (0, 0, 8), (1, 1, 0), (0, 1, 0, 0), (6, 0), (9,), (0, 1, 3), (0, 0, 0, 3), (1, 0, 2), (0, 5, 0), (3, 1), (0, 0, 2, 0), (7, 0), (1, 4)]  # noqa: E501
ZEPHYR_STAGE2 = [(0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (2, 0), (0, 0, 1), (0, 4), (5,), (0, 5), (0, 1, 0), (1, 1), (6,), (0, 0, 2), (3, 0), (0, 6), (7,), (0, 7), (0, 8), (0, 0, 3), (1, 0, 0), (0, 9), (0, 2, 0), (1, 2), (4, 0), (8,), (9,), (2, 1), (0, 1, 1), (0, 0, 4), (0, 0, 0, 0), (5, 0), (0, 3, 0), (1, 3), (0, 0, 5), (0, 0, 6), (6, 0), (2, 0, 0), (1, 0, 1), (0, 1, 2), (0, 4, 0), (1, 4), (3, 1), (2, 2), (0, 0, 7), (7, 0), (0, 2, 1), (0, 0, 8), (0, 1, 3), (0, 5, 0), (1, 5), (0, 0, 9), (1, 1, 0), (0, 0, 0, 1), (0, 0, 1, 0), (4, 1), (2, 3)]  # noqa: E501
# fmt: on
TREES = {
    "eagle": cpu.EAGLE_TREE,
    "mc_sim_7b_63": MC_SIM_7B_63,
    "vicuna_7b_stage2": VICUNA_7B_STAGE2,
    "zephyr_stage2": ZEPHYR_STAGE2,
    **{f"full{d}x{b}": ta.construct_full_tree_choices(d, b) for d, b in [*cpu.FULL_TREES, (5, 3)]},
}


def _case(choices, B, G, *, dtype=None, seed=0, **kw):
    dtype = dtype or DTYPE
    return cpu.make_case(choices, B, G, H=H, D=D, Mk=MK, dtype=dtype, page_size=PAGE_SIZE, device=DEV, seed=seed, **kw)


def _check(out, case, ref, tol):
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    out = out.unsqueeze(2) if case.bmhk else out
    torch.testing.assert_close(out.double(), ref, atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("paged", [False, True], ids=["padded", "paged"])
@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("tree", list(TREES))
def test_tree_attention(tree, B, G, square, paged, monkeypatch):
    choices = TREES[tree]
    case = _case(choices, B, G, square=square, paged=paged, seed=B + G)
    ran = cpu.spy_splitk(monkeypatch)
    out = ta.tree_attention(*case.args())
    assert ran == cpu.expected_splitk_runs(case)  # select_prefix_op's choice runs: no fallback
    _check(out, case, cpu.dense_reference(case), TOL[DTYPE])


@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.parametrize("G", [1, 2])
def test_large_tree(G, square):
    """A full binary tree of depth 10 (2047 nodes): the prefix on split-K with 2047 queries per sequence."""
    case = _case(ta.construct_full_tree_choices(10, 2), 1, G, square=square, paged=True)
    _check(ta.tree_attention(*case.args()), case, cpu.dense_reference(case), TOL[DTYPE])


@pytest.mark.parametrize("bmhk", [False, True], ids=["bmghk", "bmhk"])
@pytest.mark.parametrize("tree", ["eagle", "mc_sim_7b_63", "full3x2"])
def test_fp16_and_bmhk(tree, bmhk):
    G = 1 if bmhk else 2
    case = _case(TREES[tree], 16, G, square=False, paged=True, dtype=torch.float16, bmhk=bmhk, shared_kv=bmhk)
    out = ta.tree_attention(*case.args())
    _check(out, case, cpu.dense_reference(case), TOL[torch.float16])


@pytest.mark.parametrize("tree", ["eagle", "mc_sim_7b_63"])
def test_path_unrolled_through_operators(tree):
    """xFormers' own check: every root-to-leaf path appended to the cache and run through
    memory_efficient_attention_forward with BlockDiagonalCausalWithOffsetPaddedKeysMask (bf16, our operators)."""
    choices = TREES[tree]
    case = _case(choices, 16, 2, square=False, paged=True)
    out = ta.tree_attention(*case.args())
    B, Tkv, G, _, _ = case.q_full64.shape
    Tq = case.q.shape[1]
    for path in cpu.leaf_paths(choices):
        L, pad = len(path), MK + len(path)
        k, v = (torch.zeros(B, pad, G, 1, D, device=DEV, dtype=DTYPE) for _ in range(2))
        for b, rows in enumerate(case.rows):
            n = len(rows)
            k[b, :n], v[b, :n] = case.cache_k64[rows].to(DTYPE), case.cache_v64[rows].to(DTYPE)
            k[b, n : n + L], v[b, n : n + L] = (x[b, path, :, :1].to(DTYPE) for x in (case.spec_k64, case.spec_v64))
        lens = [len(rows) + L for rows in case.rows]
        bias = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([L] * B, pad, lens, device=DEV)
        q = case.q_full64[:, path].to(DTYPE).reshape(1, B * L, G, H, D)
        ref = fmha.memory_efficient_attention_forward(
            q, *(x.expand(B, pad, G, H, D).reshape(1, B * pad, G, H, D) for x in (k, v)), attn_bias=bias
        ).view(B, L, G, H, D)
        mine = [i for i, node in enumerate(path) if node >= Tkv - Tq]  # the nodes among the queries
        torch.testing.assert_close(out[:, [path[i] - (Tkv - Tq) for i in mine]], ref[:, mine], atol=1e-2, rtol=3e-3)


@pytest.mark.filterwarnings("ignore:memory_efficient_attention. the backward with Paged")
@pytest.mark.parametrize("paged", [False, True], ids=["padded", "paged"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gradients(dtype, paged):
    """Float caches are differentiable: every gradient against float64 autograd, 0 in the unused cache rows (the
    paged prefix's backward runs on fmha.chunked, hence the smaller cache)."""
    case = cpu.make_case(
        MC_SIM_7B_63,
        4,
        2,
        H=H,
        D=D,
        Mk=1024,
        dtype=dtype,
        page_size=PAGE_SIZE,
        device=DEV,
        square=False,
        paged=paged,
        shared_kv=False,
    )
    cpu.check_gradients(case, TOL[dtype], TOL_GRAD[dtype])


@pytest.mark.parametrize("kind", ["int4", "int4-g4", "fp8", "fp8-bytes"])
@pytest.mark.parametrize("paged", [False, True], ids=["padded", "paged"])
def test_quantized_cache(kind, paged):
    """int4 (row- and group-wise) and fp8 caches (int32 words, uint8 bytes) against their dequantized values;
    NaN coefficients and garbage in every unused row."""
    B, G = 16, 2
    case = _case(MC_SIM_7B_63, B, G, square=False, paged=paged)
    unused = case.cache_k64.isnan().flatten(1).any(1)
    k, v = (x.nan_to_num().float() for x in (case.cache_k64, case.cache_v64))
    groups = 4 if kind == "int4-g4" else 1
    if kind.startswith("int4"):
        (kq, ks), (vq, vs) = ((quantize.quantize_kv_int4(x, groups), None) for x in (k, v))
        case.cache_k64, case.cache_v64 = (quantize.dequantize_kv_int4(x, groups, torch.float64) for x in (kq, vq))
    else:
        (kq, ks), (vq, vs) = quantize.quantize_kv_fp8(k), quantize.quantize_kv_fp8(v)
        case.cache_k64, case.cache_v64 = (
            quantize.dequantize_kv_fp8(x, s, torch.float64) for x, s in ((kq, ks), (vq, vs))
        )
    fmt = "int4" if kind.startswith("int4") else "fp8"
    cpu._poison(kq, ks, unused, fmt)
    cpu._poison(vq, vs, unused, fmt)
    shape = case.cache_k.shape[:2]

    def as_cache(x):
        return x.view(*shape, *x.shape[1:]).expand(*shape, G, H, *x.shape[3:])

    ck, cv = as_cache(kq), as_cache(vq)
    if kind == "fp8-bytes":
        ck, cv = as_cache(kq.view(torch.uint8)), as_cache(vq.view(torch.uint8))
    scales = None if ks is None else (as_cache(ks), as_cache(vs))
    out = ta.tree_attention(case.q, case.spec_k, case.spec_v, ck, cv, case.spec_bias, case.prefix_bias,
                            quantized_kv_scales=scales)  # fmt: skip
    _check(out, case, cpu.dense_reference(case), TOL_QUANTIZED)


@pytest.mark.parametrize("tree,B,G", [("mc_sim_7b_63", 16, 2), ("eagle", 32, 8)])
def test_no_host_sync_and_cuda_graph(tree, B, G):
    """A warm call makes no host sync; a captured call replays with the cache lengths updated in the bias's
    tensor and new queries written in place, as a decoding loop does. B * G = 256 > 128 leaves the prefix to the
    dispatcher, whose Triton kernel reads the lengths on the host: there split-K is passed explicitly."""
    case = _case(TREES[tree], B, G, square=True, paged=True, kv_lens=[MK - 100 * i for i in range(B)])
    Tkv = len(TREES[tree]) + 1
    default = ta.select_prefix_op(B, G, Tkv, False, case.prefix_bias, case.cache_k.dtype)
    prefix_op = None if default is not None else sk.FwOp
    assert (prefix_op is None) == (B * G <= 128)

    def call():
        return ta.tree_attention(*case.args(), prefix_op=prefix_op)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compiles, fills the launch and dispatch caches
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    new_lens = [37 * i for i in range(B)]
    case.prefix_bias.k_seqinfo.seqlen.copy_(torch.tensor(new_lens, dtype=torch.int32, device=DEV))
    case.rows = [rows[:n] for rows, n in zip(case.rows, new_lens)]
    new_q = torch.randn(case.q.shape, device=DEV).to(DTYPE)
    case.q.copy_(new_q)
    case.q_full64 = new_q.double()  # square: the queries are every node
    graph.replay()
    torch.cuda.synchronize()
    _check(out, case, cpu.dense_reference(case), TOL[DTYPE])
