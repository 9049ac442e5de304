"""The block-sparse products and softmax in torch: batched gathers of the blocks, ``matmul`` and ``index_add_``.

Same signatures and results as the Triton launchers of ``triformers.sparse._triton.blocksparse`` (float32
accumulation for half inputs); used on the CPU, for float64, and where the kernels do not run. No Python loop
runs over blocks: the blocks are processed in chunks of at most ``CHUNK_ELEMENTS`` gathered elements, which
bounds the temporary memory of a product to a few hundred MB whatever the layout; on the CPU ``CPU_CHUNK_ELEMENTS``,
so that a chunk's gathered operands stay in the caches.
"""

from __future__ import annotations

import torch

from triformers.sparse._blocksparse_layout import BlockLayout

# Gathered operand elements per chunk: 2^25 float32 = 128 MB per temporary.
CHUNK_ELEMENTS = 2**25
# On the CPU 2^20 (4 MB per float32 temporary): against 2^25, 2.4-2.5x faster at 50 % sparsity, 1.1-1.4x at 90 %,
# 0.95-0.99x at 95 % (4 heads, 4096 x 4096, blocks of 64, K = 64, float32, 2-core machine: benchmarks/results/cpu/
# sparse_matmul.json against sparse_matmul_chunk2p25.json); 2^18 and 2^22 were slower in a one-off timing.
CPU_CHUNK_ELEMENTS = 2**20


def _chunks(nnz: int, per_block: int, device: torch.device):
    limit = CPU_CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS
    step = max(1, limit // max(1, per_block))
    for start in range(0, nnz, step):
        yield slice(start, min(nnz, start + step))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sdd(a: torch.Tensor, b: torch.Tensor, info: BlockLayout) -> torch.Tensor:
    """``values [B, nnz, bs, bs]`` of ``a @ b`` at the layout's blocks (a ``[B, C, M, K]``, b ``[B, C, K, N]``)."""
    B, K = a.shape[0], a.shape[3]
    bs = info.block_size
    a_rows = a.unflatten(2, (-1, bs))  # [B, C, h, bs, K]
    b_cols = b.unflatten(3, (-1, bs)).transpose(2, 3)  # [B, C, w, K, bs]
    c, i, j = info.block_c.long(), info.block_i.long(), info.block_j.long()
    out = torch.empty((B, info.nnz, bs, bs), device=a.device, dtype=a.dtype)
    for s in _chunks(info.nnz, B * bs * max(K, 1) * 2, a.device):
        out[:, s] = torch.matmul(a_rows[:, c[s], i[s]], b_cols[:, c[s], j[s]])  # [B, n, bs, bs]
    return out


def dsd(values: torch.Tensor, dense: torch.Tensor, info: BlockLayout, out: torch.Tensor, transpose_sparse: bool):
    """Writes ``S @ dense`` (``Sᵀ @ dense`` with ``transpose_sparse``) into ``out [B, C, R·bs, N]``."""
    B, C, _, N = out.shape
    bs = info.block_size
    _, h, w = info.shape
    c = info.block_c.long()
    if transpose_sparse:
        out_row, k, rows_per_c = info.block_j.long(), info.block_i.long(), w
        values = values.transpose(-2, -1)
    else:
        out_row, k, rows_per_c = info.block_i.long(), info.block_j.long(), h
    target = c * rows_per_c + out_row  # flat (channel, block-row) of each block's output
    d_rows = dense.unflatten(2, (-1, bs))  # [B, C, K, bs, N]
    acc = torch.zeros((B, C * rows_per_c, bs, N), device=out.device, dtype=_acc_dtype(out.dtype))
    for s in _chunks(info.nnz, B * bs * max(N, 1) * 2, out.device):
        prod = torch.matmul(values[:, s], d_rows[:, c[s], k[s]])  # [B, n, bs, N]
        acc.index_add_(1, target[s], prod.to(acc.dtype))
    out.copy_(acc.view(B, C, rows_per_c * bs, N))


def _masked_scores(x: torch.Tensor, info: BlockLayout, causal: bool, scale: float) -> torch.Tensor:
    x = x.to(_acc_dtype(x.dtype)) * scale
    if causal:
        bs = info.block_size
        offs = torch.arange(bs, device=x.device)
        q_pos = info.block_i.long()[:, None] * bs + offs  # [nnz, bs]
        k_pos = info.block_j.long()[:, None] * bs + offs
        x = x.masked_fill(k_pos[:, None, :] > q_pos[:, :, None], float("-inf"))
    return x


def _row_index(info: BlockLayout) -> torch.Tensor:
    return info.block_c.long() * info.shape[1] + info.block_i.long()  # flat block-row of each block


def softmax_fwd(x: torch.Tensor, info: BlockLayout, causal: bool, scale: float) -> torch.Tensor:
    """Row softmax of ``scale · x`` over the stored blocks; 0 where a row has nothing visible."""
    B, _, bs, _ = x.shape
    s = _masked_scores(x, info, causal, scale)  # [B, nnz, bs, bs]
    rows = _row_index(info)
    n_rows = info.shape[0] * info.shape[1]
    idx = rows[None, :, None].expand(B, -1, bs)
    m = torch.full((B, n_rows, bs), float("-inf"), device=x.device, dtype=s.dtype)
    m = m.scatter_reduce(1, idx, s.amax(-1), "amax")  # row max
    m = m.masked_fill(m == float("-inf"), 0.0)[:, rows]  # [B, nnz, bs]; rows with nothing visible: 0
    e = torch.exp(s - m[..., None])
    total = torch.zeros((B, n_rows, bs), device=x.device, dtype=s.dtype).index_add_(1, rows, e.sum(-1))
    inv = torch.where(total > 0, 1.0 / total, 0.0)[:, rows]
    return (e * inv[..., None]).to(x.dtype)


def softmax_bwd(y: torch.Tensor, g: torch.Tensor, info: BlockLayout, scale: float) -> torch.Tensor:
    """Gradient of the softmax input from its output ``y`` and output gradient ``g``."""
    B, _, bs, _ = y.shape
    yf, gf = y.to(_acc_dtype(y.dtype)), g.to(_acc_dtype(y.dtype))
    rows = _row_index(info)
    n_rows = info.shape[0] * info.shape[1]
    dot = torch.zeros((B, n_rows, bs), device=y.device, dtype=yf.dtype).index_add_(1, rows, (yf * gf).sum(-1))
    return (scale * yf * (gf - dot[:, rows][..., None])).to(y.dtype)
