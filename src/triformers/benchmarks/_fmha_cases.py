"""The attention benchmark's cases: shapes, masks, and the FLOPs each mask allows (triformers.benchmarks.fmha
re-exports them)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

TOKENS = 16384


WINDOW = 1024


@dataclass
class Case:
    case: str
    B: int
    N: int
    H: int
    D: int
    causal: bool
    Hkv: int | None = None
    docs: list[int] = field(default_factory=list)

    def record(self) -> dict:
        rec = {"case": self.case, "B": self.B, "N": self.N, "H": self.H, "D": self.D, "causal": self.causal}
        if self.Hkv:
            rec["Hkv"] = self.Hkv
        if self.docs:
            rec["docs"] = len(self.docs)
        if self.case == "window":
            rec["window"] = WINDOW
        return rec

    def allowed_pairs(self) -> float:
        """Pairs (query, key) the mask allows, summed over the batch."""
        if self.case == "varlen":
            return float(sum(s * (s + 1) // 2 for s in self.docs))
        if self.case == "window":
            n = self.N
            return float(sum(min(i + 1, WINDOW) for i in range(n)))
        per = self.N * (self.N + 1) / 2 if self.causal else float(self.N * self.N)
        return self.B * per

    def fw_flops(self) -> float:
        return 4.0 * self.H * self.D * self.allowed_pairs()


def cases(selected: set[str], quick: bool) -> list[Case]:
    out = []
    if "dense" in selected:
        for D in (64, 128):
            for N in ((1024, 4096) if quick else (1024, 4096, 16384)):
                for causal in (False, True):
                    out.append(Case("dense", TOKENS // N, N, 2048 // D, D, causal))
    if "varlen" in selected:
        rng = random.Random(0)
        docs, total = [], 0
        while total < TOKENS:
            s = min(rng.randint(64, 4096), TOKENS - total)
            docs.append(s)
            total += s
        for D in (64, 128):
            out.append(Case("varlen", 1, TOKENS, 2048 // D, D, True, docs=docs))
    if "window" in selected:
        out.append(Case("window", 1, TOKENS, 16, 128, True))
    if "bias" in selected:
        out.append(Case("bias", TOKENS // 2048, 2048, 16, 128, False))
    if "gqa" in selected:
        out.append(Case("gqa", TOKENS // 4096, 4096, 32, 128, True, Hkv=8))
    return out
