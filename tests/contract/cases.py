"""The one table of cases every backend runs (tests/contract): shapes, dtypes, layouts, masked vocabulary,
temperatures; PPO options on top. Inputs are seeded, random (never zeros) and built on the backend's device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

F32 = torch.float32
NEG_INF = float("-inf")


@dataclass(frozen=True)
class Case:
    id: str
    lead: tuple[int, ...]  # leading shape of the logits [*lead, V]
    v: int
    dtype: torch.dtype = F32
    temperature: float = 1.0
    # contiguous | sliced (rows of a bigger [.., T+1, V] buffer) | transposed ([T, B, V] memory, 2-D lead) |
    # vocab-strided (stride 2 along V: ops copies it)
    layout: str = "contiguous"
    neg_inf: bool = False  # masked vocabulary: half of row 0 and a scatter of entries at -inf (labels stay finite)

    @property
    def seed(self) -> int:
        return sum(map(ord, self.id))

    def inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [*lead, V] in dtype and layout, labels [*lead] int64)``."""
        g = torch.Generator().manual_seed(self.seed)
        lead, v = self.lead, self.v
        if self.layout == "sliced":
            base = torch.randn(*lead[:-1], lead[-1] + 1, v, generator=g) * 2
            x = base[..., 1:, :]
        elif self.layout == "transposed":
            base = torch.randn(lead[1], lead[0], v, generator=g) * 2
            x = base.transpose(0, 1)
        elif self.layout == "vocab-strided":
            base = torch.randn(*lead, 2 * v, generator=g) * 2
            x = base[..., ::2]
        else:
            x = torch.randn(*lead, v, generator=g) * 2
        labels = torch.randint(0, v, lead, generator=g)
        if self.neg_inf:  # contiguous layout: views write through
            xr, lr = x.view(-1, v), labels.view(-1)
            xr[0, : v // 2] = NEG_INF
            lr[0] = v - 1
            scatter = torch.rand(xr.shape, generator=g) < 0.1
            scatter[torch.arange(xr.shape[0]), lr] = False
            xr[scatter] = NEG_INF
        x = x.to(self.dtype)
        return x.to(device), labels.to(device)


# V = 1 and odd V, 1-D to 3-D leads, each dtype, each layout, masked vocabulary, temperatures, a large V.
CASES = [
    Case("V=1", (5,), 1),
    Case("odd-V", (41,), 1271),
    Case("2d-temp0.7", (3, 7), 1271, temperature=0.7),
    Case("3d-temp1.7", (2, 3, 5), 257, temperature=1.7),
    Case("bf16", (4, 9), 1031, torch.bfloat16, temperature=0.9),
    Case("fp16", (4, 9), 515, torch.float16),
    Case("sliced-misaligned", (3, 8), 1031, layout="sliced"),
    Case("transposed", (4, 6), 300, layout="transposed"),
    Case("vocab-strided", (2, 5), 300, layout="vocab-strided"),
    Case("neg-inf", (2, 6), 777, neg_inf=True),
    Case("V=32000", (1, 3), 32000),
]
CASE_IDS = [c.id for c in CASES]


@dataclass(frozen=True)
class PpoCase:
    id: str
    kl_kind: str = "k3"
    kl_coef: float = 0.05
    entropy_coef: float = 0.01
    clip_high: float | None = None
    dual_clip: float | None = None
    temperature: float = 1.0
    agg: str = "token-mean"
    with_ref: bool = True


# Every KL kind and aggregation, dual clip, asymmetric clip, temperature, no reference, KL as a statistic only.
PPO_CASES = [
    PpoCase("k1-token-mean", "k1"),
    PpoCase("k2-dual-seq-sum", "k2", dual_clip=3.0, agg="seq-mean-token-sum"),
    PpoCase("k3-cliphigh-seq-mean", "k3", clip_high=0.28, temperature=0.8, agg="seq-mean-token-mean"),
    PpoCase("abs-sum-norm", "abs", dual_clip=2.5, agg="seq-mean-token-sum-norm"),
    PpoCase("no-ref", with_ref=False, kl_coef=0.0, entropy_coef=0.0),
    PpoCase("kl-stat-only", "k2", kl_coef=0.0),
]
PPO_CASE_IDS = [c.id for c in PPO_CASES]
