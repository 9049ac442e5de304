"""Memory: attention never materializes the [Mq, Mkv] score matrix nor copies expanded K/V.

Each case runs in a fresh Python process; the kernel's peak-RSS counter (VmHWM) is reset right before the
call, so the figure is the call's own peak growth.
"""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.manual_seed(0)
    from triformers.ops import fmha
    from triformers.ops.fmha import attn_bias as ab

    def rss_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    case, op_name, backward = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    op = {"chunked": fmha.MemoryEfficientAttentionChunkedOp, "auto": None}[op_name]
    if case == "blockdiag":
        H, K = 2, 64
        bias = ab.BlockDiagonalMask.from_seqlens([8192, 8192]).make_causal()
        q, k, v = (torch.randn(1, 16384, H, K, requires_grad=backward) for _ in range(3))
    else:  # MQA: 256 query heads share one K/V head; an expanded copy of K and V would be 2 x 512 MiB
        H, K, Mq, Mkv = 256, 64, 16, 8192
        bias = None
        q = torch.randn(1, Mq, H, K, requires_grad=backward)
        k1, v1 = (torch.randn(1, Mkv, 1, K, requires_grad=backward) for _ in range(2))
        k, v = k1.expand(1, Mkv, H, K), v1.expand(1, Mkv, H, K)
    grad = torch.randn(1, q.shape[1], H, K) if backward else None
    fmha.memory_efficient_attention(q[:, :64], k[:, :64], v[:, :64], op=op)  # warm-up allocations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = rss_kb("VmRSS:")
    out = fmha.memory_efficient_attention(q, k, v, bias, op=op)
    if backward:
        out.backward(grad)
    peak = rss_kb("VmHWM:")
    print(json.dumps({"growth_mb": (peak - base) / 1024}))
    """
)


def _peak_growth_mb(case: str, op: str, backward: bool) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, case, op, "1" if backward else "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth_mb"]


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux /proc/self/clear_refs to reset VmHWM")


@pytest.mark.slow
@pytest.mark.parametrize("op", ["chunked", "auto"])
def test_block_diagonal_16k_tokens_under_400mb(op):
    """Two 8192-token causal sequences, H=2, K=64, fp32: one score matrix would be 1 GiB per head."""
    growth = _peak_growth_mb("blockdiag", op, backward=False)
    assert growth < 400, f"peak grew by {growth:.0f} MB"


@pytest.mark.slow
def test_block_diagonal_backward_memory():
    growth = _peak_growth_mb("blockdiag", "chunked", backward=True)
    assert growth < 400, f"peak grew by {growth:.0f} MB"


@pytest.mark.parametrize("backward", [False, True], ids=["fw", "fwbw"])
def test_mqa_reads_expanded_kv_in_place(backward):
    growth = _peak_growth_mb("mqa", "chunked", backward=backward)
    assert growth < 200, f"peak grew by {growth:.0f} MB (an expanded copy of K/V would be 1024 MB)"
