"""The benchmark: FLOP counts against the published figures, and a quick smoke run (no timing asserted)."""

import json

import pytest

from siglip_scratch import get_preset
from siglip_scratch.bench import flops_per_image, main


@pytest.mark.parametrize(
    "preset, gflops",
    [("google/siglip-base-patch16-224", 35.4), ("google/siglip-so400m-patch14-224", 220.0)],
)
def test_flop_count_matches_published_figures(preset, gflops):
    got = flops_per_image(get_preset(preset)) / 1e9
    assert abs(got - gflops) / gflops < 0.02, f"{preset}: {got:.1f} GFLOP vs {gflops}"


def test_quick_bench_smoke(tmp_path, hf):
    assert main(["--quick", "--out", str(tmp_path), "--sections", "encoder,parity,convert"]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = data["encoder"]["rows"]
    assert {(r["dtype"], r["batch"]) for r in rows} == {
        ("float32", 1),
        ("float32", 2),
        ("bfloat16", 1),
        ("bfloat16", 2),
    }
    assert all(r["ours_img_s"] > 0 and r["transformers_sdpa_img_s"] > 0 for r in rows)
    assert data["parity"]["rows"][0]["siglip_parity_peak_rss_mb"] > 0
    assert data["convert"]["siglip_convert_wall_s"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "### Encoder throughput" in md and "### Converter" in md and "### Parity harness cost" in md
