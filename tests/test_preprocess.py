"""`--candidate-processor`: a candidate image processor against transformers' own, with the cause named.

The ports are in tests/processor_ports.py, written as users write them (PIL or torch, not through our
renderer). The pass rule is transformers' own PIL-vs-torchvision spread per probe image (docs/PARITY.md).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from siglip_scratch.parity.cli import main as parity_main
from siglip_scratch.parity.preprocess import (
    VARIANTS,
    Recipe,
    compare_processor,
    probe_images,
    reference_processor,
    render,
)
from siglip_scratch.processor import SiglipImageProcessor

from . import processor_ports as ports
from .catalogue import covers

PORTS = "tests/processor_ports.py"
BICUBIC_224 = SiglipImageProcessor(size=(224, 224))


def _show(report) -> str:
    return report.table() + "\nranking: " + json.dumps(report.ranking, indent=1)


def test_transformers_own_processor_passes_and_gets_no_cause(hf):
    ref, _ = reference_processor(BICUBIC_224)
    report = compare_processor(ref, BICUBIC_224, name="transformers")
    assert report.passed and report.cause is None and report.ranking == [], _show(report)
    assert all(p.rms_levels == 0.0 for p in report.probes), _show(report)


def _torchvision_arithmetic(hf):
    transparency = "white" if int(hf.__version__.split(".")[0]) >= 5 else "drop"  # as each version converts
    fast = replace(BICUBIC_224, backend="fast", transparency=transparency)
    return lambda im: torch.from_numpy(fast.preprocess_one(im))


def test_transformers_torchvision_arithmetic_passes_against_its_backend(hf):
    """backend="fast" is transformers' torchvision processor bit for bit (make compat checks that against the
    real one, which is also judged there)."""
    report = compare_processor(_torchvision_arithmetic(hf), BICUBIC_224, name="fast", backend="torchvision")
    assert report.passed and report.cause is None and report.backend == "torchvision", _show(report)
    assert all(p.rms_levels == 0.0 for p in report.probes), _show(report)
    assert max(p.spread_max_levels for p in report.probes) >= 10, "the two backends should differ by many levels"


def test_was_wrong_a_pil_port_with_torchvision_arithmetic_passed_within_the_backends_spread(hf):
    """The hf-processors-rs case: a "pil" port up to 20 levels off Pillow on the tall probe passed, because
    transformers' torchvision processor is as far off there. Against the PIL backend it now fails (2 levels
    on the small probe, 20 on the tall one), and the cause names the backend it does match."""
    report = compare_processor(_torchvision_arithmetic(hf), BICUBIC_224, name="fast", backend="pil")
    assert not report.passed, _show(report)
    tall = next(p for p in report.probes if p.image.startswith("tall"))
    assert not tall.passed and tall.max_levels >= 10, _show(report)
    assert report.cause.startswith("the torchvision backend's arithmetic"), _show(report)
    assert "--processor-backend torchvision" in report.verdict


def test_a_pil_port_fails_against_the_torchvision_backend_and_is_named(hf):
    report = compare_processor(ports.faithful, BICUBIC_224, name="faithful", backend="torchvision")
    assert not report.passed and report.cause.startswith("the pil backend's arithmetic"), _show(report)


def test_the_default_backend_is_the_one_auto_image_processor_gives_here(hf, tmp_path):
    """No torchvision beside torch 2.13 here: AutoImageProcessor gives the PIL processor (make compat checks
    the torchvision default where it imports)."""
    from siglip_scratch.parity.preprocess import auto_backend

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(BICUBIC_224.to_dict()))
    auto = hf.AutoImageProcessor.from_pretrained(tmp_path)
    want = getattr(auto, "backend", None) or ("torchvision" if type(auto).__name__.endswith("Fast") else "pil")
    assert auto_backend(BICUBIC_224) == want
    report = compare_processor(ports.faithful, BICUBIC_224, name="faithful")
    assert report.backend == want and report.backend_chosen_by == "AutoImageProcessor"
    assert report.passed == (want == "pil"), _show(report)


@covers("P19")
def test_cli_processor_backend(capsys, hf):
    fast = f"{PORTS}:torchvision_arithmetic"
    assert parity_main(["--candidate-processor", fast, "--processor-backend", "torchvision", "--quiet"]) == 0
    assert "the torchvision backend" in capsys.readouterr().out
    assert parity_main(["--candidate-processor", fast, "--processor-backend", "pil", "--quiet"]) == 1
    assert "pass --processor-backend torchvision" in capsys.readouterr().out
    assert parity_main(["--processor-backend", "pil"]) == 2
    err = capsys.readouterr().err
    assert "--processor-backend applies to --candidate-processor" in err and len(err.strip().splitlines()) == 1, err
    assert parity_main(["--candidate-processor", fast, "--processor-backend", "fast"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'fast'" in err and len(err.strip().splitlines()) == 1, err


def test_a_faithful_port_passes(hf):
    report = compare_processor(ports.faithful, BICUBIC_224, name="faithful")
    assert report.passed and report.cause is None, _show(report)


@pytest.mark.parametrize(
    ("port", "cause"),
    [
        ("imagenet_stats", "ImageNet mean/std"),
        ("bilinear", "bilinear resize"),
        ("centre_crop", "centre crop"),
        ("torch_interpolate", "resize without antialias"),
        ("bgr", "BGR channel order"),
    ],
)
def test_a_buggy_port_fails_with_its_cause_named(hf, port, cause):
    report = compare_processor(getattr(ports, port), BICUBIC_224, name=port)
    assert not report.passed, _show(report)
    assert report.cause is not None and report.cause.startswith(cause), _show(report)
    assert f"likely cause: {cause}" in report.verdict


def test_an_unknown_bug_fails_with_no_cause(hf):
    report = compare_processor(ports.brighter, BICUBIC_224, name="brighter")
    assert not report.passed and report.cause is None, _show(report)
    assert "no known preprocessing variant reproduces it" in report.verdict


@pytest.mark.parametrize("resample", [3, 2], ids=["bicubic-ref", "bilinear-ref"])
def test_every_variant_is_named_when_planted(hf, resample):
    """Each library variant, rendered and handed in as the candidate, fails and is named first (a variant
    that equals an earlier one for this reference, like 'bilinear without antialias' on a bilinear
    reference, is named as that earlier one)."""
    proc = SiglipImageProcessor(size=(224, 224), resample=resample)
    ref, _ = reference_processor(proc)
    base = None
    for alpha in ("white", "drop"):
        r = Recipe(size=(224, 224), resample="bicubic" if resample == 3 else "bilinear", alpha=alpha)
        if all(
            torch.equal(render(im, r), ref(im)) or (render(im, r) - ref(im)).abs().max() < 1e-5
            for _, im in probe_images()
        ):
            base = r
    assert base is not None, "no recipe reproduces transformers"
    seen: dict[Recipe, str] = {}
    for variant in VARIANTS:
        changed = variant.change(base)
        if changed is None:
            continue
        expected = seen.setdefault(changed, variant.name)
        report = compare_processor(lambda im, c=changed: render(im, c), proc, name=variant.name)
        assert not report.passed, f"{variant.name}: " + _show(report)
        assert report.cause == expected, f"{variant.name}: " + _show(report)


# -- the CLI -----------------------------------------------------------------------------------------------
def test_cli_judges_a_processor_alone(capsys, tmp_path, hf):
    out = tmp_path / "pre.json"
    md = tmp_path / "pre.md"
    rc = parity_main(["--candidate-processor", f"{PORTS}:bilinear", "--json", str(out), "--markdown", str(md)])
    text = capsys.readouterr().out
    assert rc == 1, text
    assert "likely cause: bilinear resize" in text and "probe image" in text, text
    data = json.loads(out.read_text())
    assert data["passed"] is False and data["likely_cause"].startswith("bilinear") and len(data["probes"]) == 7
    assert "### Preprocessing" in md.read_text()
    assert parity_main(["--candidate-processor", f"{PORTS}:faithful", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("PASS: preprocessing matches transformers")


def test_cli_judges_processor_and_candidate_together(capsys, tmp_path, hf):
    out = tmp_path / "both.json"
    argv = ["--preset", "google/siglip-base-patch16-224", "--depth", "coarse", "--mode", "isolated", "--batch", "1"]
    rc = parity_main(
        [
            *argv,
            "--candidate",
            "tests/handwritten_port.py:build",
            "--candidate-processor",
            f"{PORTS}:imagenet_stats",
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 1, text  # the encoder passes, the processor does not
    data = json.loads(out.read_text())
    assert data["passed"] is False and data["preprocessing"]["passed"] is False
    assert all(s["passed"] for s in data["sites"]), "the encoder itself matches"
    assert "likely cause: ImageNet mean/std" in text


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (f"{PORTS}:raises", "candidate processor raised RuntimeError: no such mode"),
        (f"{PORTS}:nothing", "has no callable 'nothing'"),
        ("missing_file.py:fn", "file not found"),
        ("nocolon", "is not module.path:function"),
    ],
)
@covers("P13")
def test_cli_bad_processor_is_one_line_exit_2(capsys, hf, spec, message):
    assert parity_main(["--candidate-processor", spec]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
