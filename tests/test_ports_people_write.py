"""Ports written the way people write them get the right verdict in the default invocation (the real-ports issue).

Each verdict is checked against a truth computed *without the harness*: the port, loaded by an explicit name map
(`ports_people_write.convert_state`), runs end to end, and its final outputs are compared with transformers run in
float64 on the same weights. A port is honest when its error is within a few times transformers' own float32 error
(the same order as the harness's rule, but on the final output only); a planted bug is far outside it. The harness
must agree: honest ports pass, planted bugs fail, at layer 0 and the last layer. Tests named ``was_wrong_*``
failed before this change (false FAIL on an exact port).
"""

from __future__ import annotations

import pytest
import torch

from siglip_scratch.config import SiglipVisionConfig
from siglip_scratch.modeling import synthetic_state_dict
from siglip_scratch.parity import Weights, compare
from siglip_scratch.parity.reference import build_reference

from . import ports_people_write as ports
from .conftest import require_transformers

require_transformers()

SMALL = SiglipVisionConfig(
    hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=16
)
LAST = SMALL.num_hidden_layers - 1
# An honest port's final error over transformers' own float32 error, at most (measured: 0.8–1.6 for these styles);
# the planted bugs below are at ×30 and more.
HONEST_FACTOR = 4.0


DTYPES = ("float32", "bfloat16", "float16")


@pytest.fixture(scope="module")
def all_weights() -> dict[str, Weights]:
    state = synthetic_state_dict(SMALL, seed=0)
    return {
        dt: Weights(SMALL, {k: v.to(getattr(torch, dt)) for k, v in state.items()}, f"small (seed 0) {dt}", True)
        for dt in DTYPES
    }


@pytest.fixture(scope="module")
def weights(all_weights) -> Weights:
    return all_weights["float32"]


def _truth(w: Weights):
    """The final outputs of transformers in float64 (the truth) and in the run's dtype (its own error)."""
    dtype = next(iter(w.state_dict.values())).dtype
    pixels = torch.rand(2, 3, SMALL.image_size, SMALL.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pixels = pixels.to(dtype)
    ref64 = build_reference(SMALL, {k: v.double() for k, v in w.state_dict.items()})
    ref = build_reference(SMALL, w.state_dict)
    with torch.inference_mode():
        return pixels, ref64(pixels.double()), ref(pixels)


@pytest.fixture(scope="module")
def truth(weights):
    return _truth(weights)


def _err(out: dict, t) -> float:
    """The worse of the two final outputs' RMS error against the float64 truth, relative to its RMS."""
    errs = []
    for got, want in ((out["last_hidden_state"], t.last_hidden_state), (out["pooler_output"], t.pooler_output)):
        errs.append(((got.double() - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item())
    return max(errs)


def _independent_verdict(style: str, bug: str | None, layer: int, weights: Weights, truth) -> tuple[bool, float]:
    """(honest?, error ratio) from the port's final output alone, loaded without the harness."""
    pixels, t, r = truth
    port = ports.PeoplePort(SMALL.to_dict(), style, bug, layer).to(pixels.dtype)
    state = ports.convert_state(weights.state_dict, style, SMALL.num_hidden_layers)
    port.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    with torch.inference_mode():
        out = port.eval()(pixels.clone())
    ref_err = _err({"last_hidden_state": r.last_hidden_state, "pooler_output": r.pooler_output}, t)
    ratio = _err(out, t) / ref_err
    return ratio <= HONEST_FACTOR, ratio


@pytest.mark.parametrize(
    "style",
    [
        pytest.param("inplace", id="was_wrong_inplace_residuals"),
        pytest.param("inline_attn", id="was_wrong_inline_attention"),
        pytest.param("linear_patch", id="was_wrong_linear_patch_embedding_and_inplace_pos"),
        pytest.param("float64", id="was_wrong_whole_model_in_float64"),
        pytest.param("fused_qkv", id="was_wrong_fused_qkv_loader_and_own_names"),
        pytest.param("einsum", id="was_wrong_einsum_attention_beside_a_loader"),
        pytest.param("mha", id="nn_multihead_attention_in_every_layer"),
    ],
)
def test_honest_port_passes_in_the_default_invocation(style, weights, truth, hf):
    honest, ratio = _independent_verdict(style, None, 0, weights, truth)
    assert honest, f"{style}: the port itself is not exact (×{ratio:.3g} transformers' own error): fix the test port"
    report = compare(weights=weights, candidate=ports.build(style))
    assert report.passed, f"{style} (independently ×{ratio:.3g}, honest) was judged:\n{report.table()}"
    assert not report.unloaded_parameters, report.unloaded_parameters
    layers = [f"vision_model.encoder.layers.{i}" for i in range(SMALL.num_hidden_layers)]
    judged = {s.name for s in report.sites if s.status in ("exact", "ok")}
    assert set(layers) <= judged, f"{style}: not every layer output was judged:\n{report.table()}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("style", ["inplace", "inline_attn", "linear_patch", "fused_qkv", "mha"])
def test_honest_port_passes_in_low_precision(style, dtype, all_weights):
    w = all_weights[dtype]
    honest, ratio = _independent_verdict(style, None, 0, w, _truth(w))
    assert honest, f"{style} in {dtype}: the port itself is ×{ratio:.3g} transformers' own error"
    report = compare(weights=w, candidate=ports.build(style), dtype=dtype)
    assert report.passed, f"{style} in {dtype} (independently ×{ratio:.3g}) was judged:\n{report.table()}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("style", ["inplace", "inline_attn"])
def test_planted_eps_in_the_last_layer_fails_in_low_precision(style, dtype, all_weights):
    report = compare(weights=all_weights[dtype], candidate=ports.build(style, "scale", LAST), dtype=dtype)
    assert not report.passed and report.first_divergent_site.startswith(f"vision_model.encoder.layers.{LAST}"), (
        report.table()
    )


def test_inline_attention_is_not_exposed_never_mapped_to_its_output_projection(weights, hf):
    """Root cause: inference took ``to_out`` (whose output is the attention's) for ``self_attn``; its input is
    not the LayerNorm output, so it is not that site. The site is NOT EXPOSED: not compared, not counted."""
    report = compare(weights=weights, candidate=ports.build("inline_attn"))
    attn = [s for s in report.sites if s.name.endswith(".self_attn")]
    assert attn and all(s.status == "not_exposed" for s in attn), report.table()
    assert "NOT EXPOSED" in report.verdict and "NOT EXPOSED" in report.table()
    assert all(not r[0].endswith("to_out") for r in [tuple(x) for x in report.candidate["inferred_rename"]]) or all(
        not r[1].endswith("self_attn") for r in report.candidate["inferred_rename"]
    ), report.candidate["inferred_rename"]


@pytest.mark.parametrize("style", ["inplace", "inline_attn", "linear_patch", "fused_qkv"])
@pytest.mark.parametrize("bug, layer", [("eps", 0), ("eps", LAST), ("scale", 0), ("scale", LAST)])
def test_planted_bug_in_a_port_fails(style, bug, layer, weights, truth, hf):
    honest, ratio = _independent_verdict(style, bug, layer, weights, truth)
    report = compare(weights=weights, candidate=ports.build(style, bug, layer))
    where = f"vision_model.encoder.layers.{layer}"
    if honest:  # a bug too small to see at the final output must still not be called a pass of a wrong layer
        assert ratio > 1.0, ratio
    assert not report.passed, f"{style}, {bug} in layer {layer} (independently ×{ratio:.3g}) passed:\n{report.table()}"
    assert report.first_divergent_site.startswith(where), report.table()


def test_was_wrong_torch_compile_of_an_exact_port(weights, truth, hf):
    """Was: exit 2 (dynamo traced the harness's hooks; teacher forcing fed a [B, N, D] tensor to the patch conv).
    The sites are judged on the eager module the compiled wrapper holds; the compiled forward runs end to end and
    its final outputs are judged against the propagated oracle."""
    honest, ratio = _independent_verdict("plain", None, 0, weights, truth)
    assert honest, ratio
    report = compare(weights=weights, candidate=ports.build("plain_compiled"))
    assert report.passed, report.table()
    assert report.compiled_sites and all(s.passed for s in report.compiled_sites), report.table()
    assert "torch.compile" in report.table()


def test_a_bug_only_the_compiled_forward_has_is_caught(weights, hf):
    """The eager module is right but the compiled forward is not (a stand-in for a miscompile: the compiled
    wrapper's forward scales the output): the sites pass, the compiled forward's outputs fail."""
    report = compare(weights=weights, candidate=ports.build("plain_compiled", "compiled_scale"))
    assert not report.passed and report.compiled_sites is not None, report.table()
    assert "(the compiled forward)" in report.verdict, report.verdict


def test_patches_in_column_major_order_are_blamed_at_the_embeddings_and_named(weights, truth, hf):
    """Was (#23): with the inferred map 15 of 23 sites MISSING (every value after the embeddings is permuted, so
    value-based inference found nothing) and the verdict blamed a missing module; with a map the embeddings were
    blamed with no cause and the amplification line said "drift". Now the layers are found by structure (their
    parameters), the embeddings fail first, the cause is named and the wording says where the error was made."""
    honest, ratio = _independent_verdict("plain", "column_major", 0, weights, truth)
    assert not honest, ratio
    report = compare(weights=weights, candidate=ports.build("plain", "column_major"))
    assert not report.passed and report.missing_sites == [], report.table()
    assert report.first_divergent_site == "vision_model.embeddings", report.table()
    assert report.diagnosis and "column-major" in (report.diagnosis["likely_cause"] or ""), report.diagnosis
    line = report.amplification_line()
    assert line and "a local error at vision_model.embeddings" in line and "drift" not in line, line
