"""CSR products and softmax with autograd: torch's sparse CSR kernels, our Triton kernels, or gathers.

One pattern ``[m, n]`` serves every batch element. Which implementation runs (per call):

- float32/float64: torch's CSR kernels (MKL on the CPU, cuSPARSE on CUDA). The batch becomes one block-diagonal
  CSR matrix ``[B·m, B·n]``, so one ``torch.sparse.mm`` (SpMM) or ``torch.sparse.sampled_addmm`` (SDDMM) call
  covers it.
- float16/bfloat16 where Triton runs: our kernels (:mod:`triformers.sparse._triton.csr`).
- anything else (half precision on the CPU): gathers, ``index_add_`` and ``sum`` in torch.

The products are closed under differentiation::

    spmm   O = S @ D          dS = (Og @ Dᵀ)|pattern (sddmm)    dD = Sᵀ @ Og (spmm on the transposed pattern)
    sddmm  V = (A @ Bm)|pat   dA = Vg @ Bmᵀ (spmm)              dBm = (Vgᵀ @ A)ᵀ (spmm on the transposed pattern)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from triformers.sparse._backend import run_triton

_TORCH_CSR_DTYPES = (torch.float32, torch.float64)
# Gathered elements per chunk of the gather path: 2^25 float32 = 128 MB per temporary.
CHUNK_ELEMENTS = 2**25


@dataclass(eq=False)
class CSRPattern:
    """A CSR pattern ``[m, n]`` and its tables (int32 on one device), shared by the tensors that use it.

    Attributes:
        row_offsets: ``[m + 1]``; column_indices: ``[nnz]``.
        row_indices: rows by decreasing number of entries (Sputnik's load-balancing order).
        rows: ``[nnz]`` row of each entry.
    """

    m: int
    n: int
    row_offsets: torch.Tensor
    column_indices: torch.Tensor
    row_indices: torch.Tensor
    rows: torch.Tensor
    _transposed: tuple | None = field(default=None, repr=False)
    _flat: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, row_offsets: torch.Tensor, column_indices: torch.Tensor, m: int, n: int) -> CSRPattern:
        row_offsets = row_offsets.to(torch.int32).contiguous()
        column_indices = column_indices.to(torch.int32).contiguous()
        counts = row_offsets.diff().long()
        rows = torch.repeat_interleave(torch.arange(m, device=counts.device), counts)
        order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
        return cls(m, n, row_offsets, column_indices, order, rows.to(torch.int32))

    @property
    def nnz(self) -> int:
        return self.column_indices.numel()

    def to(self, device) -> CSRPattern:
        if self.row_offsets.device == torch.device(device):
            return self
        return CSRPattern(self.m, self.n, *(t.to(device) for t in (self.row_offsets, self.column_indices,
                                                                      self.row_indices, self.rows)))

    def transposed(self) -> tuple[CSRPattern, torch.Tensor]:
        """The pattern of the transpose and ``perm``: its entry e is this pattern's entry ``perm[e]``."""
        if self._transposed is None:
            cols = self.column_indices.long()
            perm = torch.argsort(cols * self.m + self.rows.long(), stable=True)  # by (column, row)
            offsets = torch.zeros(self.n + 1, dtype=torch.long, device=cols.device)
            offsets[1:] = torch.bincount(cols, minlength=self.n).cumsum(0)
            t = CSRPattern.build(offsets, self.rows[perm], self.n, self.m)
            t._transposed = (self, torch.argsort(perm))
            self._transposed = (t, perm)
        return self._transposed

    def flat_csr(self, values: torch.Tensor) -> torch.Tensor:
        """The batch as one block-diagonal torch CSR tensor ``[B·m, B·n]`` holding ``values [B, nnz]``."""
        B = values.shape[0]
        if B not in self._flat:
            base = torch.arange(B, device=values.device)
            crow = (self.row_offsets[:-1].long()[None] + base[:, None] * self.nnz).flatten()
            crow = torch.cat([crow, crow.new_full((1,), B * self.nnz)])
            col = (self.column_indices.long()[None] + base[:, None] * self.n).flatten()
            self._flat[B] = (crow, col)
        crow, col = self._flat[B]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                crow, col, values.reshape(-1), (B * self.m, B * self.n), check_invariants=False
            )


def _kind(op: str, *tensors: torch.Tensor) -> str:
    dtype = tensors[0].dtype
    if dtype in _TORCH_CSR_DTYPES:
        return "torch"
    return "triton" if run_triton(op, *tensors) else "gather"


def _chunks(nnz: int, per_entry: int):
    step = max(1, CHUNK_ELEMENTS // max(1, per_entry))
    for start in range(0, nnz, step):
        yield slice(start, min(nnz, start + step))


def spmm(values: torch.Tensor, dense: torch.Tensor, p: CSRPattern) -> torch.Tensor:
    """``[B, m, K]`` = ``S (values [B, nnz]) @ dense [B, n, K]`` (no autograd)."""
    B, _, K = dense.shape
    kind = _kind("sparse_csr_matmul", values, dense)
    if kind == "torch":
        out = torch.sparse.mm(p.flat_csr(values), dense.reshape(B * p.n, K))
        return out.view(B, p.m, K)
    if kind == "triton":
        from triformers.sparse._triton import csr

        return csr.spmm(values, dense, p.row_offsets, p.column_indices, p.row_indices, p.m)
    acc = torch.zeros((B, p.m, K), device=dense.device, dtype=torch.float32)
    rows, cols = p.rows.long(), p.column_indices.long()
    for s in _chunks(p.nnz, B * K):
        acc.index_add_(1, rows[s], values[:, s, None].float() * dense[:, cols[s]].float())
    return acc.to(dense.dtype)


def sddmm(a: torch.Tensor, bt: torch.Tensor, p: CSRPattern) -> torch.Tensor:
    """``[B, nnz]``: ``(a [B, m, K] @ bt [B, n, K]ᵀ)`` at the pattern (no autograd)."""
    B, _, K = a.shape
    kind = _kind("sparse_csr_masked_matmul", a, bt)
    if kind == "torch":
        zeros = p.flat_csr(a.new_zeros((B, p.nnz)))
        flat_b = bt.reshape(B * p.n, K).t()  # [K, B·n]: batch b's columns sit at b·n, where its entries look
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            out = torch.sparse.sampled_addmm(zeros, a.reshape(B * p.m, K), flat_b, beta=0.0)
        return out.values().view(B, p.nnz)
    if kind == "triton":
        from triformers.sparse._triton import csr

        return csr.sddmm(a, bt, p.row_offsets, p.column_indices, p.row_indices, p.nnz)
    out = torch.empty((B, p.nnz), device=a.device, dtype=a.dtype)
    rows, cols = p.rows.long(), p.column_indices.long()
    for s in _chunks(p.nnz, B * K):
        out[:, s] = (a[:, rows[s]].float() * bt[:, cols[s]].float()).sum(-1).to(a.dtype)
    return out


def spmm_t(values: torch.Tensor, dense: torch.Tensor, p: CSRPattern) -> torch.Tensor:
    """``Sᵀ @ dense`` (``dense [B, m, K]`` -> ``[B, n, K]``)."""
    pt, perm = p.transposed()
    return spmm(values[:, perm], dense, pt)


class _SpMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, dense, p):
        ctx.save_for_backward(values, dense)
        ctx.p = p
        return spmm(values, dense.contiguous(), p)

    @staticmethod
    def backward(ctx, grad):
        values, dense = ctx.saved_tensors
        grad = grad.contiguous()
        gv = sddmm(grad, dense.contiguous(), ctx.p) if ctx.needs_input_grad[0] else None
        gd = spmm_t(values, grad, ctx.p) if ctx.needs_input_grad[1] else None
        return gv, gd, None


class _SDDMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, p):
        ctx.save_for_backward(a, b)
        ctx.p = p
        return sddmm(a.contiguous(), b.transpose(1, 2).contiguous(), p)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.contiguous()
        ga = spmm(grad, b.transpose(1, 2).contiguous(), ctx.p) if ctx.needs_input_grad[0] else None
        gb = spmm_t(grad, a.contiguous(), ctx.p).transpose(1, 2) if ctx.needs_input_grad[1] else None
        return ga, gb, None


def csr_matmul(values: torch.Tensor, dense: torch.Tensor, p: CSRPattern) -> torch.Tensor:
    """Differentiable ``S @ dense``."""
    return _SpMM.apply(values, dense, p)


def csr_masked_matmul(a: torch.Tensor, b: torch.Tensor, p: CSRPattern) -> torch.Tensor:
    """Differentiable ``(a @ b)`` at the pattern's entries: ``[B, nnz]``."""
    return _SDDMM.apply(a, b, p)


def csr_softmax(values: torch.Tensor, p: CSRPattern) -> torch.Tensor:
    """Differentiable row softmax over the stored entries (torch ops on ``[B, nnz]``: O(nnz) work)."""
    B = values.shape[0]
    x = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
    rows = p.rows.long()
    idx = rows[None].expand(B, -1)
    m = torch.full((B, p.m), float("-inf"), device=x.device, dtype=x.dtype)
    m = m.scatter_reduce(1, idx, x.detach(), "amax")  # the row max only stabilises: no gradient
    e = torch.exp(x - m.gather(1, idx))
    total = torch.zeros((B, p.m), device=x.device, dtype=x.dtype).index_add(1, rows, e)
    return (e / total.gather(1, idx)).to(values.dtype)
