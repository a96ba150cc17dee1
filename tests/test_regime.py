"""Synthetic weights in a trained tower's regime (the real-ports issue, item 1).

The i.i.d. draw keeps every activation O(10) and attention logits near 5, so bugs that need large values (a clamp
"to keep activations safe", float16 overflow in a hand-written LayerNorm or a softmax without max-subtraction)
passed. The trained regime puts a few residual-stream entries in the hundreds and attention logits in the 30s–40s
(`modeling.TRAINED_REGIME`); those bugs now fail, honest candidates still pass, and the report says which regime.
Each bug's truth is computed without the harness (its final output against transformers in float64).
"""

from __future__ import annotations

import pytest
import torch

from siglip_scratch import SiglipVisionModel
from siglip_scratch.config import get_preset
from siglip_scratch.model import SiglipAttention
from siglip_scratch.modeling import synthetic_state_dict
from siglip_scratch.parity import Weights, compare
from siglip_scratch.parity.reference import build_reference

from .conftest import require_transformers

BASE = "google/siglip-base-patch16-224"
# The comparisons run on a small tower (4 layers) in the same regime; the regime's figures are checked at base-224.
SMALL = get_preset(BASE).replace(
    hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=64
)


def _weights(regime: str, dtype: str = "float32") -> Weights:
    state = synthetic_state_dict(SMALL, seed=0, regime=regime, dtype=getattr(torch, dtype))
    return Weights(SMALL, state, f"small (seed 0, {regime})", synthetic=True, regime=regime)


@pytest.fixture(scope="module")
def stats():
    """Max |x| at every layer output and max attention logit per layer, both regimes, on base-224."""
    require_transformers()
    cfg = get_preset(BASE)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = {}
    for regime in ("iid", "trained"):
        model = SiglipVisionModel.from_config(cfg, seed=0, regime=regime)
        top, logits = [], []
        for layer in model.vision_model.encoder.layers:
            layer.register_forward_hook(lambda m, a, o, top=top: top.append(o.abs().max().item()))

            def qk(mod, args, attn=layer.self_attn, logits=logits):
                h = args[0]
                B, N, _ = h.shape
                q = attn.q_proj(h).view(B, N, attn.num_heads, -1).transpose(1, 2)
                k = attn.k_proj(h).view(B, N, attn.num_heads, -1).transpose(1, 2)
                logits.append(((q @ k.transpose(-1, -2)) * attn.scale).max().item())

            layer.self_attn.register_forward_pre_hook(qk)
        with torch.inference_mode():
            model(x)
        out[regime] = (max(top), min(logits), max(logits))
    return out


def test_trained_regime_has_massive_activations_and_sharp_attention(stats):
    top, lo, hi = stats["trained"]
    assert 250 <= top <= 1000, f"max |x| {top:.3g}: trained towers reach hundreds"
    assert 25 <= lo and hi <= 60, f"attention logits {lo:.3g}–{hi:.3g}: trained SigLIP towers reach 30–45"
    iid_top, _, iid_hi = stats["iid"]
    assert iid_top < 30 and iid_hi < 10, stats["iid"]  # why the i.i.d. draw could not see these bugs


def clamped(cfg: dict) -> SiglipVisionModel:
    """Keeps the residual stream "in a safe range" after every layer."""
    model = SiglipVisionModel(type(SMALL).from_dict(cfg))
    for layer in model.vision_model.encoder.layers:
        forward = layer.forward
        layer.forward = lambda h, *a, _f=forward, **k: _f(h, *a, **k).clamp(-100, 100)
    return model


def _naive_attention(attn: SiglipAttention, x: torch.Tensor) -> torch.Tensor:
    B, N, D = x.shape
    q, k, v = (p(x).view(B, N, attn.num_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    e = ((q @ k.transpose(-1, -2)) * attn.scale).exp()  # no max subtraction
    return attn.out_proj(((e / e.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(B, N, D))


def _naive_norm(mod: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.pow(2).mean(-1, keepdim=True) - mean.pow(2)  # x² in the run's dtype
    return (x - mean) / (var + mod.eps).sqrt() * mod.weight + mod.bias


def naive_fp16(cfg: dict) -> SiglipVisionModel:
    """A hand-written LayerNorm (x.pow(2).mean()) and a softmax without max-subtraction, as ports write them."""
    model = SiglipVisionModel(type(SMALL).from_dict(cfg))
    for m in model.modules():
        if isinstance(m, SiglipAttention):
            m.forward = lambda x, *a, _m=m, **k: _naive_attention(_m, x)
        elif isinstance(m, torch.nn.LayerNorm):
            m.forward = lambda x, _m=m: _naive_norm(_m, x)
    return model


def _truth_wrong(factory, regime: str, dtype: torch.dtype) -> bool:
    """Without the harness: is the candidate's final output far outside transformers' own error?"""
    cfg = SMALL
    state = synthetic_state_dict(cfg, seed=0, regime=regime)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cand = factory(cfg.to_dict())
    cand.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    ref = build_reference(cfg, {k: v.to(dtype) for k, v in state.items()})
    with torch.inference_mode():
        t = build_reference(cfg, {k: v.double() for k, v in state.items()})(x.double()).pooler_output
        got, own = cand.to(dtype)(x.to(dtype)).pooler_output.double(), ref(x.to(dtype)).pooler_output.double()
    err = (got - t).norm() / t.norm()
    return not bool(torch.isfinite(err)) or err > 10 * (own - t).norm() / t.norm()


@pytest.mark.parametrize(
    "factory, dtype",
    [
        pytest.param(clamped, "float32", id="was_wrong_clamp_at_100"),
        pytest.param(naive_fp16, "float16", id="was_wrong_fp16_naive_norm_and_softmax"),
    ],
)
def test_bugs_that_need_large_values_fail_on_trained_regime_weights(factory, dtype, hf):
    assert _truth_wrong(factory, "trained", getattr(torch, dtype)), "the planted bug does not matter: fix the test"
    report = compare(weights=_weights("trained", dtype), candidate=factory, dtype=dtype)
    assert not report.passed, report.table()
    assert report.weights["regime"] == "trained" and "trained regime" in report.table().splitlines()[0]
    iid = compare(weights=_weights("iid", dtype), candidate=factory, dtype=dtype)
    assert iid.passed, iid.table()  # invisible on i.i.d. weights, which is why they are not the default...
    assert any("could not have been seen" in n for n in iid.notes), iid.notes  # ...and the report says so


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_ours_passes_on_trained_regime_weights(dtype, hf):
    report = compare(weights=_weights("trained", dtype), dtype=dtype)
    assert report.passed, report.table()
    assert not any("could not have been seen" in n for n in report.notes), report.notes


def test_ours_passes_at_base_224_on_the_default_preset_weights(hf):
    report = compare(preset=BASE, batch=1, depth="coarse")
    assert report.passed and report.weights["regime"] == "trained", report.table()


def test_regime_reaches_every_front_door(tmp_path, hf):
    from siglip_scratch.parity.activations import export_inputs
    from siglip_scratch.parity.weights import resolve_weights

    trained = resolve_weights(preset=BASE)
    assert (
        trained.regime == "trained"
        and trained.state_dict["vision_model.embeddings.position_embedding.weight"].abs().max() >= 250
    )
    iid = resolve_weights(preset=BASE, synthetic="iid")
    assert iid.regime == "iid" and "i.i.d." in iid.source
    export_inputs(tmp_path / "x", preset=BASE, batch=1)
    import json

    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["weights"]["regime"] == "trained"
    with pytest.raises(ValueError, match="unknown regime"):
        synthetic_state_dict(get_preset(BASE), regime="gaussian")
