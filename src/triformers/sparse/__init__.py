"""Sparse tensors (xFormers' ``xformers.sparse``): block-sparse and CSR, with Triton kernels on CUDA.

- :class:`BlockSparseTensor`: ``[B, C, M, N]`` stored as ``bs x bs`` blocks at a ``[C, h, w]`` layout.
- :class:`SparseCSRTensor`: ``[B, M, N]`` with one CSR pattern shared by the batch.
- :func:`masked_matmul`: ``a @ b`` kept at a mask (dense, block-sparse or CSR).
"""

from triformers.sparse._masked_matmul import masked_matmul
from triformers.sparse.blocksparse_tensor import BlockSparseTensor
from triformers.sparse.csr_tensor import SparseCSRTensor

__all__ = ["BlockSparseTensor", "SparseCSRTensor", "masked_matmul"]
