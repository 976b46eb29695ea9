"""Benchmark: the fused LM head, forward + backward of the PPO loss straight from hidden states.

``hidden [B, T, H]`` and an LM-head ``weight [V, H]``: logits ``h @ W.T`` would be ``[N, V]``. Objective per valid
token (token-mean over the mask): clipped surrogate (clip 0.2) + ``KL_COEF`` * k3 KL to a reference policy
- ``ENTROPY_COEF`` * entropy; gradients w.r.t. ``hidden`` and ``weight``.

Providers: every fastppo backend (``ppo_loss_from_hidden``: chunked, logits never materialised), the tiled Triton
kernel (``fastppo[triton-tiled]``, GPU), eager PyTorch
(``linear`` + ``log_softmax`` + gather + entropy + the formulas), ``torch.compile`` of it, ``matmul-floor`` (the
three matmuls alone, ``h @ W.T``, ``dl @ W``, ``dl.T @ h``: the work no implementation avoids; not checked),
Liger's ``LigerFusedLinearGRPOLoss`` (chunked per sequence; its objective has no entropy term, loss ``bnpo``),
Apple's Cut-Cross-Entropy ``linear_cross_entropy`` (its ``torch_compile`` implementation on CPU, ``cce`` on GPU;
objective: mean cross-entropy of the valid tokens), verl's ``linear_cross_entropy`` (Triton, GPU only:
logprobs + entropy, then the same formulas). Every provider's error is measured against the float64 reference
of the objective it computes (``OBJECTIVES``), computed one sequence at a time.

Minimum bytes: ``3*V*H*e`` (read W twice, write dW once) + ``3*N*H*e`` (read h twice, write dh) + ``21N``.
The peak-memory column is what matters here: ``peak_vs_N.png`` plots it against N.
"""

from __future__ import annotations

import torch
from torch import Tensor

import fastppo
from fastppo.reference import linear as RL

from .providers import Missing, Provider, compiled, fastppo_backends, fastppo_name, needs_cuda, peer_attr
from .runner import Case, ErrorMeter

OP = "linear"
CLIP = 0.2
KL_COEF = 0.04
ENTROPY_COEF = 0.01
SEQ_LEN = 256  # tokens per sequence (Liger chunks one sequence at a time)
LIGER_COMPILED = True  # Liger's default: its loss math under torch.compile
# What each provider computes: the full objective, the objective without entropy (Liger), mean cross-entropy (CCE),
# and each objective variant with and without entropy ("<variant>" / "<variant>-no-entropy").
OBJECTIVES = ("ppo+entropy", "ppo", "ce")

# The objective variants, each a row of fastppo's default backend for the device next to Liger's fused loss with the
# same loss_type where Liger has one: name -> (PPOObjective settings on top of the base PPO loss, Liger's settings or
# None, whether the variant is token-separable or needs a sequence statistic first (one pass on CPU with whole sequences
# per chunk, two passes where a sequence outgrows a chunk).
VARIANTS: dict[str, tuple[dict, dict | None, bool]] = {
    "cispo": ({"policy_loss": "cispo", "clip_low": 1.0, "clip_high": 4.0},
              {"loss_type": "cispo", "epsilon_high": 5.0}, True),
    "sapo": ({"policy_loss": "sapo", "agg": "seq-mean-token-mean"}, {"loss_type": "sapo"}, True),
    "k3+": ({"kl_kind": "k3+"}, None, True),
    "tis": ({"rollout_is_level": "token", "rollout_is_max": 1.2}, {"loss_type": "bnpo"}, True),
    "gspo": ({"importance_sampling_level": "sequence", "agg": "seq-mean-token-mean"},
             {"loss_type": "grpo", "importance_sampling_level": "sequence"}, False),
    "gspo-token": ({"importance_sampling_level": "sequence_token"}, None, False),
    "off-policy-mask": ({"off_policy_mask_threshold": 0.01}, None, False),
}


def variant_objective(name: str, *, entropy: bool = True, normalizer: float | None = None) -> fastppo.PPOObjective:
    """The PPOObjective of a variant row (``normalizer``: a sequence's share of the batch, for the reference)."""
    base = {"clip_low": CLIP, "kl_coef": KL_COEF, "kl_kind": "k3", "entropy_coef": ENTROPY_COEF if entropy else 0.0}
    return fastppo.PPOObjective(**{**base, **VARIANTS[name][0], "loss_normalizer": normalizer})


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """``[(N, H, V)]``. CPU: the fused LM head's CPU target shape N=1024, H=512, V=151936 (Qwen2) and smaller N for the
    memory-vs-N plot; GPU: N up to 16384 at H=4096."""
    if device.type == "cuda":
        if quick:
            return [(2048, 1024, 32000)]
        return [(n, 4096, 151936) for n in (4096, 16384)]
    if quick:
        return [(128, 64, 4096)]
    return [(n, 512, 151936) for n in (256, 512, 1024)]


def dtypes(device: torch.device, quick: bool) -> tuple[torch.dtype, ...]:
    return (torch.bfloat16,) if device.type == "cuda" else (torch.float32,)


def min_bytes(n: int, h: int, v: int, dtype: torch.dtype) -> int:
    e = torch.empty((), dtype=dtype).element_size()
    return 3 * v * h * e + 3 * n * h * e + 21 * n


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    t = min(SEQ_LEN, n)
    b = n // t
    g = torch.Generator(device="cpu").manual_seed(seed)
    hid = torch.randn(b, t, h, generator=g)
    w = torch.randn(v, h, generator=g) * (2.0 / h**0.5)  # logits of std ~2, like a trained LM head
    lab = torch.randint(0, v, (b, t), generator=g)
    # The current policy's log-probs, one sequence at a time to bound memory, on the bench's device: on a GPU case
    # (N=16384, H=4096) computing them on the CPU took minutes, longer than every provider together.
    hd, wd = hid.to(device=device, dtype=dtype).float(), w.to(device=device, dtype=dtype).float()
    with torch.no_grad():
        lp = torch.stack([RL.linear_logprobs(hd[i], wd, lab[i].to(device)) for i in range(b)]).cpu()
    del hd, wd
    old = lp + 0.15 * torch.randn(b, t, generator=g)
    ref_lp = lp + 0.15 * torch.randn(b, t, generator=g)
    rollout = old + 0.15 * torch.randn(b, t, generator=g)  # the sampler's log-probs (rollout-correction variants)
    adv = torch.randn(b, generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    to = lambda x: x.to(device).contiguous()  # noqa: E731
    return {"hidden": to(hid.to(dtype)), "weight": to(w.to(dtype)), "labels": to(lab), "old": to(old),
            "ref": to(ref_lp), "rollout": to(rollout), "adv_seq": to(adv), "adv": to(adv[:, None].expand(b, t)),
            "mask": to(mask)}


def _reference_piece(objective: str, h: Tensor, w: Tensor, lab: Tensor, old: Tensor, ref_lp: Tensor, adv: Tensor,
                     m: Tensor, total: Tensor, rollout: Tensor, n_seq: int) -> Tensor:
    """One sequence's share of the objective, in float64 (sums over sequences to the batch's loss)."""
    variant = objective.removesuffix("-no-entropy")
    if variant in VARIANTS:
        from fastppo import reference as ref

        seq_agg = variant_objective(variant).agg != "token-mean"
        obj = variant_objective(variant, entropy=not objective.endswith("-no-entropy"),
                                normalizer=float(n_seq) if seq_agg else float(total))
        logits = torch.nn.functional.linear(h, w)[None]
        return ref.ppo_loss_from_logits(logits, lab[None], old[None], adv[None], m[None], ref_logprobs=ref_lp[None],
                                        rollout_logprobs=rollout[None], objective=obj)[0]
    if objective == "ce":
        return -(RL.linear_logprobs(h, w, lab) * m).sum() / total
    lp, ent = RL.linear_logprobs_and_entropy(h, w, lab)
    from fastppo import reference as ref

    pg = ref.ppo_token_terms(lp, old, adv, clip_low=CLIP)[0]
    per_tok = pg + KL_COEF * ref.kl_penalty(lp, ref_lp, "k3")
    if objective == "ppo+entropy":
        per_tok = per_tok - ENTROPY_COEF * ent
    return (per_tok * m).sum() / total


def make_check(inputs: dict[str, Tensor]):
    """Error (``ErrorMeter``) of the loss and the hidden/weight gradients vs float64, per objective (cached)."""
    hid, w, lab, mask = inputs["hidden"], inputs["weight"], inputs["labels"], inputs["mask"]
    old, ref_lp, adv = inputs["old"].double(), inputs["ref"].double(), inputs["adv"].double()
    rollout = inputs["rollout"].double()
    m = mask.double()
    total = m.sum()
    cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def reference(objective: str) -> tuple[Tensor, Tensor, Tensor]:
        if objective not in cache:
            w64 = w.double().requires_grad_(True)
            loss = torch.zeros((), dtype=torch.float64, device=w.device)
            dh = torch.empty(hid.shape, dtype=torch.float64, device=hid.device)
            dw = torch.zeros_like(w64)
            for i in range(hid.shape[0]):
                h64 = hid[i].double().requires_grad_(True)
                piece = _reference_piece(objective, h64, w64, lab[i], old[i], ref_lp[i], adv[i], m[i], total,
                                         rollout[i], hid.shape[0])
                gh, gw = torch.autograd.grad(piece, (h64, w64))
                loss, dh[i] = loss + piece.detach(), gh
                dw += gw
            cache[objective] = (loss, dh, dw)
        return cache[objective]

    def check(out: dict[str, Tensor]) -> float:
        loss64, dh64, dw64 = reference(out.get("objective", "ppo+entropy"))
        meter = ErrorMeter()
        meter.add("loss", out["loss"].reshape(()), loss64, scale=max(float(loss64.abs()), 1e-3))
        meter.add("grad_hidden", out["grad_hidden"], dh64)
        meter.add("grad_weight", out["grad_weight"], dw64)
        return meter.value()

    return check


# ------------------------------------------------------------------------------------------------ providers
def eager_loss(h: Tensor, w: Tensor, lab: Tensor, old: Tensor, ref_lp: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """Plain formulas in the inputs' dtype: logits, log_softmax, gather, entropy, then the loss in fp32."""
    logits = torch.nn.functional.linear(h, w)
    logp_all = torch.log_softmax(logits, dim=-1)
    lp = logp_all.gather(-1, lab.unsqueeze(-1)).squeeze(-1).float()
    ent = -(logp_all.exp() * logp_all).sum(-1).float()
    ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    d = ref_lp - lp
    kl = torch.exp(d) - d - 1
    m = mask.float()
    return ((pg + KL_COEF * kl - ENTROPY_COEF * ent) * m).sum() / m.sum()


def _runner(case: Case, fn, objective: str = "ppo+entropy"):
    """Forward + backward: ``fn(hidden, weight) -> scalar loss``; returns the loss and both gradients."""
    h0, w0 = case.inputs["hidden"], case.inputs["weight"]

    def run():
        h = h0.detach().requires_grad_(True)
        w = w0.detach().requires_grad_(True)
        loss = fn(h, w)
        gh, gw = torch.autograd.grad(loss, (h, w))
        return {"loss": loss.detach(), "grad_hidden": gh, "grad_weight": gw, "objective": objective}
    return run


def _args(case: Case) -> tuple[Tensor, ...]:
    i = case.inputs
    return i["labels"], i["old"], i["ref"], i["adv"], i["mask"]


def _eager(case: Case):
    args = _args(case)
    return _runner(case, lambda h, w: eager_loss(h, w, *args))


def _compile(case: Case):
    args = _args(case)
    f = compiled(eager_loss)
    return _runner(case, lambda h, w: f(h, w, *args))


def _floor(case: Case):
    """The three matmuls of any LM-head backward, unchunked: what a fused implementation cannot go below."""
    h0 = case.inputs["hidden"].reshape(-1, case.inputs["hidden"].shape[-1])
    w0 = case.inputs["weight"]

    def run():
        logits = h0 @ w0.t()
        dh = logits @ w0
        dw = logits.t() @ h0
        return {"grad_hidden": dh, "grad_weight": dw}
    return run


def _fastppo(backend: str, why: str | None) -> Provider:
    def setup(case: Case):
        if why is not None:
            raise Missing(why)
        lab, old, ref_lp, adv, mask = _args(case)

        def fn(h: Tensor, w: Tensor) -> Tensor:
            return fastppo.ppo_loss_from_hidden(h, w, lab, old, adv, mask, ref_logprobs=ref_lp, kl_coef=KL_COEF,
                                                kl_kind="k3", entropy_coef=ENTROPY_COEF, clip_low=CLIP,
                                                backend=backend)[0]
        return _runner(case, fn)
    return Provider(fastppo_name(backend), "fastppo", setup, "ppo_loss_from_hidden (chunked, default chunk size)")


def _default_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpp"


def _fastppo_variant(variant: str) -> Provider:
    def setup(case: Case):
        backend = _default_backend(case.device)
        if not fastppo.backends()[backend].available:
            raise Missing(f"backend {backend!r} unavailable: {fastppo.backends()[backend].reason}")
        lab, old, ref_lp, adv, mask = _args(case)
        obj = variant_objective(variant)
        rollout = case.inputs["rollout"]

        def fn(h: Tensor, w: Tensor) -> Tensor:
            return fastppo.ppo_loss_from_hidden(h, w, lab, old, adv, mask, ref_logprobs=ref_lp,
                                                rollout_logprobs=rollout, objective=obj, backend=backend)[0]
        return _runner(case, fn, objective=variant)
    kind = "token-separable" if VARIANTS[variant][2] else "a sequence statistic first"
    return Provider(f"fastppo {variant}", "fastppo", setup, f"ppo_loss_from_hidden, {variant} ({kind})")


def _liger_variant(variant: str) -> Provider:
    def setup(case: Case):
        loss_cls = peer_attr("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
        i = case.inputs
        liger = dict(VARIANTS[variant][1])
        kw = {"epsilon_low": CLIP, "epsilon_high": CLIP, **liger}
        mod = loss_cls(beta=KL_COEF, compiled=LIGER_COMPILED, use_ref_model=True, chunk_size=1, temperature=1.0, **kw)
        mask = i["mask"].long()
        extra = {}
        obj = variant_objective(variant)
        if obj.rollout_is_level is not None:  # Liger takes the correction's weights, fastppo the sampler's log-probs
            from fastppo.reference.objective import rollout_weights

            extra["vllm_is_ratio"] = rollout_weights(i["old"], i["rollout"], i["mask"], obj)[0]

        def fn(h: Tensor, w: Tensor) -> Tensor:
            loss, _ = mod(h, w, i["labels"], mask, i["adv_seq"], ref_per_token_logps=i["ref"],
                          old_per_token_logps=i["old"], **extra)
            return loss
        return _runner(case, fn, objective=f"{variant}-no-entropy")
    return Provider(f"liger-fused-linear {variant}", "peer", setup,
                    f"LigerFusedLinearGRPOLoss loss_type={VARIANTS[variant][1]['loss_type']} (no entropy term)")


def _fastppo_tiled(case: Case):
    """The tiled Triton kernel (``FASTPPO_LM_HEAD=tiled``): logits tiles never leave SRAM (GPU only)."""
    needs_cuda(case.device, "the tiled Triton LM-head kernel (timing the interpreter means nothing)")
    import os

    lab, old, ref_lp, adv, mask = _args(case)

    def fn(h: Tensor, w: Tensor) -> Tensor:
        prev = os.environ.get("FASTPPO_LM_HEAD")
        os.environ["FASTPPO_LM_HEAD"] = "tiled"
        try:
            loss = fastppo.ppo_loss_from_hidden(h, w, lab, old, adv, mask, ref_logprobs=ref_lp, kl_coef=KL_COEF,
                                                kl_kind="k3", entropy_coef=ENTROPY_COEF, clip_low=CLIP,
                                                backend="triton")[0]
        finally:
            if prev is None:
                os.environ.pop("FASTPPO_LM_HEAD")
            else:
                os.environ["FASTPPO_LM_HEAD"] = prev
        return loss
    return _runner(case, fn)


def _liger(case: Case):
    loss_cls = peer_attr("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
    i = case.inputs
    mod = loss_cls(beta=KL_COEF, compiled=LIGER_COMPILED, use_ref_model=True, chunk_size=1, epsilon_low=CLIP,
                   epsilon_high=CLIP, loss_type="bnpo", temperature=1.0)
    mask = i["mask"].long()

    def fn(h: Tensor, w: Tensor) -> Tensor:
        loss, _ = mod(h, w, i["labels"], mask, i["adv_seq"], ref_per_token_logps=i["ref"],
                      old_per_token_logps=i["old"])
        return loss
    return _runner(case, fn, objective="ppo")


def _cce(case: Case):
    lce = peer_attr("cut_cross_entropy", "linear_cross_entropy")
    i = case.inputs
    impl = "cce" if case.device.type == "cuda" else "torch_compile"
    targets = torch.where(i["mask"], i["labels"], torch.full_like(i["labels"], -100))  # ignore_index

    def fn(h: Tensor, w: Tensor) -> Tensor:
        return lce(h, w, targets, impl=impl, reduction="mean")
    return _runner(case, fn, objective="ce")


def _verl(case: Case):
    needs_cuda(case.device, "verl's linear_cross_entropy (a Triton kernel)")
    lce = peer_attr("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy")
    lab, old, ref_lp, adv, mask = _args(case)

    def fn(h: Tensor, w: Tensor) -> Tensor:
        b, t, hd = h.shape
        lp, ent = lce(h.reshape(-1, hd), w, lab.reshape(-1), 1.0, "none")
        lp, ent = lp.float().view(b, t), ent.float().view(b, t)
        ratio = torch.exp(lp - old)
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
        d = ref_lp - lp
        m = mask.float()
        return ((pg + KL_COEF * (torch.exp(d) - d - 1) - ENTROPY_COEF * ent) * m).sum() / m.sum()
    return _runner(case, fn)


def providers(device: torch.device) -> list[Provider]:
    out = [Provider("eager", "baseline", _eager, "linear + log_softmax + gather + entropy"),
           Provider("torch.compile", "baseline", _compile),
           Provider("matmul-floor", "baseline", _floor, "h @ W.T, dl @ W, dl.T @ h alone", checked=False)]
    out += [_fastppo(b, why) for b, why in fastppo_backends("ppo_loss", device)]
    out.append(Provider("fastppo[triton-tiled]", "fastppo", _fastppo_tiled, "FASTPPO_LM_HEAD=tiled"))
    out += [
        Provider("liger-fused-linear", "peer", _liger, "LigerFusedLinearGRPOLoss (bnpo, no entropy term)"),
        Provider("cut-cross-entropy", "peer", _cce, "linear_cross_entropy (mean CE; torch_compile on CPU)"),
        Provider("verl-linear-ce", "peer", _verl, "verl linear_cross_entropy (logprobs + entropy)"),
    ]
    for variant, (_, liger, _) in VARIANTS.items():
        out.append(_fastppo_variant(variant))
        if liger is not None:
            out.append(_liger_variant(variant))
    return out


def cases(device: torch.device, quick: bool, suite: str = "linear"):
    for n, h, v in shapes(device, quick):
        for dtype in dtypes(device, quick):
            inputs = make_inputs(n, h, v, dtype, device)
            b, t = inputs["labels"].shape
            yield Case(suite, OP, "fwd+bwd", device, dtype, {"N": n, "H": h, "V": v, "B": b, "T": t}, inputs,
                       min_bytes(n, h, v, dtype), make_check(inputs))
            del inputs
