"""A runtime that is uniformly a little less accurate passes; a bug on top of it still fails, at its site, named.

The runtime is `ports_people_write.CoarseLayerNorm` (float32 LayerNorm outputs rounded to 20 mantissa bits: ×3.4
transformers' own error at every norm, noise-like), a stand-in for MLX's LayerNorm (×3.4–4.6, measured with
`examples/mlx_vlm_port.py`, which `make runtimes` runs for real). Each verdict is checked against a truth computed
without the harness: the port's final outputs against transformers in float64 (`test_ports_people_write`).
"""

from __future__ import annotations

import pytest
import torch

from siglip_scratch.modeling import synthetic_state_dict
from siglip_scratch.parity import Weights, compare
from siglip_scratch.parity.baseline import apply_runtime_baseline
from siglip_scratch.parity.judge import Rule, SiteResult

from . import ports_people_write as ports
from .conftest import require_transformers
from .test_ports_people_write import LAST, SMALL, _independent_verdict, _truth

require_transformers()


@pytest.fixture(scope="module", params=["iid", "trained"])
def regime_weights(request):
    w = Weights(SMALL, synthetic_state_dict(SMALL, seed=0, regime=request.param), f"small {request.param}", True)
    return w, _truth(w)


@pytest.fixture(scope="module")
def weights():
    w = Weights(SMALL, synthetic_state_dict(SMALL, seed=0), "small (seed 0)", True)
    return w, _truth(w)


def _table(report) -> str:
    return report.table() + f"\nruntime baseline: {report.runtime_baseline}\ndiagnosis: {report.diagnosis}"


def test_was_wrong_a_runtime_with_a_uniformly_coarser_layernorm_failed(regime_weights, hf):
    w, truth = regime_weights
    honest, ratio = _independent_verdict("coarse_norm", None, 0, w, truth)
    assert honest, f"the coarse-norm port is ×{ratio:.3g} transformers' own error end to end: fix the test port"
    report = compare(weights=w, candidate=ports.build("coarse_norm"))
    assert report.passed, _table(report)
    assert report.runtime_baseline and report.runtime_baseline[0]["kind"] == "norm", _table(report)
    accepted = [s for s in report.sites if s.status == "runtime"]
    assert accepted and all(
        s.name.rsplit(".", 1)[-1] in ("layer_norm1", "layer_norm2", "post_layernorm") for s in accepted
    )
    assert all(s.ratio > 2.0 for s in accepted), "an accepted site should be one the ×2 rule alone fails"
    assert "runtime baseline accepted at" in report.verdict and "RUNTIME" in report.table()


@pytest.mark.parametrize(
    ("bug", "layer", "site", "cause"),
    [
        ("eps", 0, "vision_model.encoder.layers.0.layer_norm2", "LayerNorm eps 1e-5"),
        ("scale", 0, "vision_model.encoder.layers.0.self_attn", "attention scaled by 1/head_dim"),
        ("scale", LAST, f"vision_model.encoder.layers.{LAST}.self_attn", "attention scaled by 1/head_dim"),
        ("gelu", 1, "vision_model.encoder.layers.1.mlp", "the other GELU"),
        ("gelu", LAST, f"vision_model.encoder.layers.{LAST}.mlp", "the other GELU"),
    ],
)
def test_a_bug_on_top_of_the_runtime_fails_at_its_site_and_is_named(bug, layer, site, cause, weights, hf):
    """The runtime's uniform excess before the bug is not blamed (it used to be: the first norm, ×3, no cause)."""
    w, truth = weights
    honest, ratio = _independent_verdict("coarse_norm", bug, layer, w, truth)
    assert not honest, f"{bug} in layer {layer} is ×{ratio:.3g} end to end: too small to be a planted bug here"
    report = compare(weights=w, candidate=ports.build("coarse_norm", bug, layer))
    assert not report.passed and report.first_divergent_site == site, _table(report)
    assert (report.diagnosis or {}).get("likely_cause", "") and report.diagnosis["likely_cause"].startswith(cause), (
        _table(report)
    )
    assert f"likely cause: {cause}" in report.verdict, report.verdict


def test_eps_in_the_last_layer_on_top_of_the_runtime_still_fails(weights, hf):
    """Below the final output's resolution (×1.6 end to end) but it stands out at its norm (×23 against a ×3.4
    baseline): the rule must not absorb it."""
    w, _ = weights
    report = compare(weights=w, candidate=ports.build("coarse_norm", "eps", LAST))
    assert not report.passed and report.first_divergent_site == f"vision_model.encoder.layers.{LAST}.layer_norm2", (
        _table(report)
    )


def test_a_bug_at_every_site_of_a_kind_is_not_a_baseline(weights, hf):
    """The exact GELU in every MLP is uniform and noise-like in isolated mode, but it moves the end-to-end result:
    the propagated run first fails at an MLP before any site stands out, so the MLPs (and the layer outputs that
    contain them) get no baseline; the runtime's norms keep theirs, and the blame and the cause go to the MLP."""
    w, _ = weights

    def every_mlp_exact(cfg):
        port = ports.PeoplePort(cfg, "coarse_norm")
        for layer in port.layers:
            layer.ff.approximate = "none"
        return port

    report = compare(weights=w, candidate=every_mlp_exact)
    assert not report.passed and [b["kind"] for b in report.runtime_baseline or []] == ["norm"], _table(report)
    mlps = [s for s in report.sites if s.name.endswith(".mlp") or s.name.rsplit(".", 1)[-1].isdigit()]
    assert all(s.status == "fail" for s in mlps), _table(report)
    # nor is it taken for the candidate's arithmetic by the diagnosis (a ×500 "baseline" would hide every variant)
    assert report.first_divergent_site == "vision_model.encoder.layers.0.mlp", _table(report)
    assert (report.diagnosis or {}).get("likely_cause", "").startswith("the other GELU"), _table(report)


def test_isolated_mode_alone_cannot_accept_a_baseline_and_says_so(weights, hf):
    w, _ = weights
    report = compare(weights=w, candidate=ports.build("coarse_norm"), mode="isolated")
    assert not report.passed and report.runtime_baseline is None, _table(report)
    assert any("needs the end-to-end run (mode both)" in n for n in report.notes), report.notes


# -- the rule itself, on measured numbers ----------------------------------------------------------------
def _site(name: str, ratio: float, *, pattern: str = "noise-like", passed: bool | None = None) -> SiteResult:
    limit = 2.0 * 1e-7 + 2.0**-24
    r = SiteResult(name, err_ref=1e-7, err_cand=ratio * 1e-7, err_ref_max=1e-6, err_cand_max=ratio * 1e-6)
    r.limit, r.limit_max = limit, 4.0 * 1e-6 + 8 * 2.0**-24
    r.passed = passed if passed is not None else r.err_cand <= limit
    r.status = "ok" if r.passed else "fail"
    r.pattern = {"kind": pattern} if not r.passed else None
    return r


def _norms(ratios: list[float], **kw) -> list[SiteResult]:
    return [_site(f"vision_model.encoder.layers.{i}.layer_norm1", x, **kw) for i, x in enumerate(ratios)]


RULE = Rule("float32")


def test_rule_accepts_a_uniform_excess_when_the_end_to_end_run_passes():
    iso = _norms([3.5, 4.0, 4.2, 3.8])
    got, _ = apply_runtime_baseline(iso, [_site("vision_model.post_layernorm", 1.5)], RULE)
    assert [b.kind for b in got] == ["norm"] and len(got[0].accepted) == 4 and 3.8 < got[0].rms < 4.0
    assert all(r.status == "runtime" and r.passed for r in iso)


@pytest.mark.parametrize(
    ("ratios", "pattern", "why"),
    [
        ([3.5, 4.0, 4.2, 9.0], "noise-like", "stands out: more than twice the kind's median"),
        ([3.5, 4.0, 4.2, 3.8], "systematic", "a systematic difference is a bug's signature"),
        ([3.5, 4.0], "noise-like", "two sites: no median one bad site cannot move"),
    ],
)
def test_rule_refuses(ratios, pattern, why):
    iso = _norms(ratios, pattern=pattern)
    apply_runtime_baseline(iso, [_site("vision_model.post_layernorm", 1.5)], RULE)
    assert any(r.status == "fail" for r in iso), why
    if pattern == "noise-like" and len(ratios) > 2:
        assert [r.status for r in iso] == ["runtime"] * 3 + ["fail"], why


def test_rule_refuses_when_the_end_to_end_run_fails_before_any_standout():
    iso = _norms([3.5, 4.0, 4.2, 3.8])
    prop = [_site("vision_model.encoder.layers.1.layer_norm1", 30.0, passed=False)]
    got, _ = apply_runtime_baseline(iso, prop, RULE)
    assert not any(b.accepted for b in got) and all(r.status == "fail" for r in iso)


def test_rule_accepts_the_noise_before_a_bug_that_explains_the_end_to_end_failure():
    iso = _norms([3.5, 4.0, 4.2, 3.8, 400.0])
    prop = [_site("vision_model.encoder.layers.4.layer_norm1", 30.0, passed=False)]
    apply_runtime_baseline(iso, prop, RULE)
    assert [r.status for r in iso] == ["runtime"] * 4 + ["fail"]


def test_rule_leaves_the_absolute_rule_alone():
    iso = _norms([3.5, 4.0, 4.2, 3.8])
    got, notes = apply_runtime_baseline(iso, [], Rule("float32", atol=1e-5))
    assert got == [] and notes == [] and all(r.status == "fail" for r in iso)


def test_low_precision_runs_are_untouched_by_an_honest_port(hf):
    """bfloat16: the coarse norm rounds float32 only, so the run is an ordinary honest port there."""
    state = {k: v.to(torch.bfloat16) for k, v in synthetic_state_dict(SMALL, seed=0).items()}
    report = compare(
        weights=Weights(SMALL, state, "small bf16", True), candidate=ports.build("coarse_norm"), dtype="bfloat16"
    )
    assert report.passed and report.runtime_baseline is None, _table(report)
