"""How fast autograd sums a gradient over the broadcast dim of an ``expand``ed input (GQA/MQA K/V).

    PYTHONPATH=src python scripts/expand_grad_probe.py

An operator that reads K/V through a stride-0 head dim hands autograd one gradient for the expanded
tensor; the ``expand``'s backward then sums it over that dim. Times (ms, bf16, H100) of that sum for the
gradient given as (a) the per-head share expanded (stride 0), (b) the same written out contiguously
first, (c) zeros with the sum in head 0 (what ``x.select(dim, 0)``'s backward gives).
"""

from __future__ import annotations

import torch
import triton.testing


def main() -> None:
    for B, M, G, H, D in [(4, 4096, 8, 4, 128), (4, 4096, 1, 32, 128), (1, 16384, 8, 8, 128)]:
        g = torch.randn(B, M, G, 1, D, device="cuda", dtype=torch.bfloat16)
        shape = (B, M, G, H, D)

        def a(g=g, H=H, shape=shape):
            return (g / H).expand(shape).sum(3, keepdim=True)

        def b(g=g, H=H, shape=shape):
            return (g / H).expand(shape).contiguous().sum(3, keepdim=True)

        def c(g=g, shape=shape):
            z = g.new_zeros(shape)
            z.select(3, 0).copy_(g.squeeze(3))
            return z.sum(3, keepdim=True)

        for f in (a, b, c):
            torch.testing.assert_close(f(), g, atol=2e-2, rtol=2e-2)
        t = [triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median") for f in (a, b, c)]
        print(f"B={B} M={M} G={G} H={H} D={D}: expanded {t[0]:.4f} ms | contiguous {t[1]:.4f} ms | "
              f"zeros+select {t[2]:.4f} ms")


if __name__ == "__main__":
    main()
