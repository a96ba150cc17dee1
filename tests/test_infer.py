"""Rename maps inferred: a hand-written port and the timm-like example pass with no map at all."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from siglip_scratch.modeling import synthetic_state_dict
from siglip_scratch.parity import Weights, compare
from siglip_scratch.parity.cli import main as parity_main

from .test_parity import EXAMPLE, SMALL

PORT = Path(__file__).resolve().parent / "handwritten_port.py"


@pytest.fixture(scope="module")
def weights() -> Weights:
    return Weights(SMALL, synthetic_state_dict(SMALL, seed=0), "small (seed 0)", synthetic=True)


def test_handwritten_port_passes_with_no_map(weights, hf):
    report = compare(weights=weights, candidate=f"{PORT}:build")
    assert report.passed, report.table()
    assert report.missing_sites == [] and report.unloaded_parameters == [], report.table()
    inferred = report.candidate["inferred_rename"]
    assert ["^blocks\\.(\\d+)\\.ln1$", "vision_model.encoder.layers.\\1.layer_norm1"] in inferred, inferred
    assert [
        "^blocks\\.(\\d+)\\.attn\\.q\\.weight$",
        "vision_model.encoder.layers.\\1.self_attn.q_proj.weight",
    ] in inferred
    assert ["^ln_f$", "vision_model.post_layernorm"] in inferred and ["^pool$", "vision_model.head"] in inferred
    emb = next(s for s in report.sites if s.name == "vision_model.embeddings")
    assert emb.status == "exact" and "input of layer 0" in emb.note, emb
    assert any("rule(s) inferred" in n for n in report.notes), report.notes


def test_timm_like_example_passes_with_no_map(weights, hf):
    report = compare(weights=weights, candidate=f"{EXAMPLE}:build")
    assert report.passed and report.missing_sites == [], report.table()
    # Its loader fills the fused qkv and the [1, N, D] table; inference maps the rest (#23: a loader no longer
    # turns inference off) and says how many it left to the loader.
    account = report.candidate["inference"]["parameters"]
    assert account.startswith("53 of 66 weight tensors matched") and "13 left to its load_hf_state_dict" in account
    assert ["^pos_drop$", "vision_model.embeddings"] in report.candidate["inferred_rename"]


def test_a_bug_in_one_layer_is_still_compared_at_the_right_module(weights, hf):
    """q and k swapped in layer 2: that layer's own best match may go astray, but the rule the other
    layers agree on maps it, and the bug is blamed on layer 2's self_attn."""
    report = compare(weights=weights, candidate=f"{PORT}:build_swapped_qk_in_layer_2", mode="isolated")
    assert not report.passed
    assert report.first_divergent_site == "vision_model.encoder.layers.2.self_attn", report.table()
    assert report.missing_sites == []


def test_inspect_prints_the_map_and_writes_a_usable_one(tmp_path, capsys, hf):
    target = tmp_path / "map.json"
    argv = ["inspect", "--candidate", f"{PORT}:build", "--preset", "google/siglip-base-patch16-224"]
    assert parity_main([*argv, "--write-rename", str(target)]) == 0
    out = capsys.readouterr().out
    assert "vision_model.encoder.layers.11.self_attn    blocks.11.attn (inferred by value" in out, out
    assert "vision_model.embeddings                     input of blocks.0 (no embeddings module)" in out, out
    assert "suggested rename map (inferred):" in out and "site contract" in out
    assert "0 candidate tensor(s) not loaded" in out and "0 checkpoint tensor(s) not taken" in out, out
    rules = json.loads(target.read_text())["rename"]
    # The saved map, given back, is used as it is (nothing inferred) and passes.
    report = compare(
        preset="google/siglip-base-patch16-224", candidate=f"{PORT}:build", rename=str(target), batch=1, depth="coarse"
    )
    assert report.passed and "inferred_rename" not in report.candidate, report.table()
    per_layer = [r for r in rules if re.search(r"layers\.\d", r[1])]
    assert not per_layer, f"templates, not one rule per layer: {per_layer}"


def test_inspect_usage_errors_are_one_line(tmp_path, capsys):
    assert parity_main(["inspect", "--candidate", f"{PORT}:build", "--preset", "a/b", "--model", "c/d"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert parity_main(["inspect", "--candidate", f"{PORT}:build", "--write-rename", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_skip_site_is_reported_skipped_never_passed(weights, hf):
    """A site the user declares not applicable: SKIPPED, not compared, and the
    verdict says so; a pattern that matches no site is a usage error before anything runs."""
    report = compare(weights=weights, candidate=f"{PORT}:build", skip_sites=[r".*\.layers\.1\.mlp"], depth="fine")
    assert report.passed, report.table()
    assert report.skipped_sites == ["vision_model.encoder.layers.1.mlp"]
    site = next(s for s in report.sites if s.name == "vision_model.encoder.layers.1.mlp")
    assert site.status == "skipped" and site.max_abs is None and not site.exact
    assert "1 site(s) SKIPPED" in report.verdict and "SKIPPED" in report.table()
    assert json.loads(report.to_json())["skipped_sites"] == ["vision_model.encoder.layers.1.mlp"]
    # Skipping a failing site does not hide the failure elsewhere: layer 2's bug still fails the run.
    bad = compare(
        weights=weights, candidate=f"{PORT}:build_swapped_qk_in_layer_2", skip_sites=[r".*layers\.2\.self_attn"]
    )
    assert not bad.passed and bad.first_divergent_site.startswith("vision_model.encoder.layers.2"), bad.table()
    with pytest.raises(Exception, match="matches no site"):
        compare(weights=weights, skip_sites=["vision_model.nothing"])


def test_progress_lines_on_stderr_only_when_asked_or_interactive(capsys, hf):
    argv = ["--preset", "google/siglip-base-patch16-224", "--candidate", f"{PORT}:build", "--batch", "1"]
    assert parity_main([*argv, "--depth", "coarse", "--progress"]) == 0
    captured = capsys.readouterr()
    lines = [line.split("] ", 1)[1] for line in captured.err.splitlines()]
    phases = [line for line in lines if not line.endswith(" done")]  # per-group lines come on a slow machine
    assert phases == [
        "loading weights",
        "reference and float64 oracle (isolated + propagated) at 15 sites",
        "candidate: loading weights and inferring its rename map",
        "candidate: isolated run",
        "candidate: propagated run",
        "candidate: state and batch check (the same images in other batches)",
    ], captured.err
    assert "rule(s) inferred" in captured.out
    assert parity_main([*argv, "--depth", "coarse", "--mode", "isolated"]) == 0  # stderr is not a terminal here
    assert capsys.readouterr().err == ""


def test_long_phases_report_each_site_group(capsys, monkeypatch, hf):
    """A phase longer than SiteProgress.every prints a line per finished group (0 s here: every group)."""
    from siglip_scratch.parity.sites import SiteProgress

    monkeypatch.setattr(SiteProgress, "every", 0.0)
    argv = ["--preset", "google/siglip-base-patch16-224", "--batch", "1", "--depth", "coarse", "--progress"]
    assert parity_main([*argv, "--mode", "isolated"]) == 0
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    groups = ["embeddings", *(f"layer {i}/12" for i in range(1, 13)), "post_layernorm"]
    for phase in ("oracle (isolated)", "candidate: isolated run"):
        got = [
            line.split(": ", 1)[1] if phase.startswith("oracle") else line.rsplit(": ", 1)[1]
            for line in lines
            if line.startswith(phase + ":")
        ]
        assert got == [f"{g} done" for g in groups], lines


class _Raises(torch.nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.stem = torch.nn.Linear(2, 2)

    def forward(self, pixel_values):
        raise RuntimeError("boom")


def test_a_candidate_whose_forward_raises_is_exit_2_not_an_internal_error(capsys, hf):
    """Inference runs the candidate before the judged runs: its exception is the user's, one line."""
    rc = parity_main(
        [
            "--preset",
            "google/siglip-base-patch16-224",
            "--candidate",
            "tests.test_infer:_Raises",
            "--batch",
            "1",
            "--mode",
            "isolated",
            "--depth",
            "coarse",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: candidate forward raised RuntimeError: boom") and err.count("\n") == 1, (
        err
    )
