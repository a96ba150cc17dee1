"""Full-size checks (`make test-slow`, marked ``slow``): so400m-384 bit-exact with transformers in
float32 and bfloat16, and the whole `make parity` suite as a test."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from siglip_scratch import SiglipVisionModel, get_preset
from siglip_scratch.parity.reference import build_reference

from .conftest import assert_exact, pixels

pytestmark = pytest.mark.slow
SO400M = "google/siglip-so400m-patch14-384"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_so400m_bit_exact_with_transformers(dtype, hf):
    cfg = get_preset(SO400M)
    ours = SiglipVisionModel.from_config(cfg, seed=0, dtype=dtype)
    ref = build_reference(cfg, ours.state_dict())
    x = pixels(cfg, 1).to(dtype)
    with torch.inference_mode():
        a, b = ours(x), ref(x)
    assert_exact(a.last_hidden_state, b.last_hidden_state, f"so400m last_hidden_state {dtype}")
    assert_exact(a.pooler_output, b.pooler_output, f"so400m pooler_output {dtype}")


def test_the_parity_suite_passes(capsys, tmp_path, hf):
    import json

    from siglip_scratch.parity.suite import main

    rc = main(["--out", str(tmp_path / "reports"), "--progress"])
    captured = capsys.readouterr()
    out = captured.out
    # One line as each comparison starts (with an ETA after the first), and per site group lines within them.
    progress = [line for line in captured.err.splitlines() if re.search(r"\] \d+/10 ", line)]
    assert len(progress) == 10 and "1/10 " in progress[0] and all("ETA" in line for line in progress[1:]), progress
    stamps = [float(m.group(1)) for m in re.finditer(r"^\[\s*(\d+)s\]", captured.err, re.M)]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) <= 10, f"a silent stretch of {max(gaps)} s on stderr"
    assert rc == 0, out
    assert "golden fingerprints hold" in out, out
    runs_md = (tmp_path / "reports" / "suite.md").read_text().split("\n## ")
    headings = [h.splitlines()[0] for h in runs_md[1:] if not h.startswith("Golden")]
    assert len(headings) == len(set(headings)) == 10, headings
    assert sum("image features" in h for h in headings) == 2, headings  # PaliGemma and LLaVA-OneVision
    starts = ("siglip-", "siglip2-", "paligemma-", "llava-")
    rows = [line for line in out.splitlines() if line.startswith(starts) and " both/" in line]
    assert len(rows) == 10 and all((" synthetic " in r or " real " in r) for r in rows), out
    runs = json.loads((tmp_path / "reports" / "suite.json").read_text())
    assert runs["passed"] is True and len(runs["runs"]) == 10
    assert runs["golden"] and all(g["holds"] for g in runs["golden"]), runs["golden"]
    assert all(r["report"]["passed"] for r in runs["runs"])
    assert (tmp_path / "reports" / "suite.md").read_text().startswith("# make parity: PASS")
    assert f"reports: {tmp_path / 'reports' / 'suite.json'}" in out


def test_range_scan_flags_nothing_on_synthetic_so400m(hf):
    from siglip_scratch.parity import compare

    report = compare(preset=SO400M, mode="propagated", depth="fine", batch=1)
    flagged = [r for r in report.ranges if r["flag"]]
    assert report.passed and len(report.ranges) == 27 * 5 + 3 and not flagged, flagged


def test_every_vlm_preset_builds_transformers_vlm_and_ours(hf):
    """Each VLM preset's config builds transformers' own VLM around our synthetic tower and projector (every key
    taken, none missing) and our SiglipImageFeatures; make parity runs two of them end to end."""
    from siglip_scratch.parity.vlm import build_features_reference, with_image_features
    from siglip_scratch.parity.weights import resolve_weights
    from siglip_scratch.vlm import VLM_PRESETS, SiglipImageFeatures

    for preset in VLM_PRESETS:
        w = with_image_features(resolve_weights(preset=preset), preset=preset)
        build_features_reference(w.features, w.config, w.state_dict)  # raises on any key it does not take
        ours = SiglipImageFeatures.from_state_dict(w.config, w.features.path, w.state_dict)
        assert sum(p.numel() for p in ours.parameters()) == sum(t.numel() for t in w.state_dict.values()), preset
        del w, ours
