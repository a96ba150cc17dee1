"""A newcomer's first hour (#23): mistakes are reported before any work, usage errors before torch is imported,
with "did you mean" for flags and presets."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from siglip_scratch.parity.cli import main as parity_main

from .catalogue import covers
from .test_parity import EXAMPLE

BASE = ["--preset", "google/siglip-base-patch16-224"]
EARLY = [
    ([*BASE, "--candidate", "/no/such/myvti.py:build"], "file not found"),
    ([*BASE, "--candidate", f"{EXAMPLE}:biuld"], "has no callable 'biuld'"),
    ([*BASE, "--json", "/proc/r.json"], "cannot write"),
    ([*BASE, "--synthetic", "gaussian"], "invalid choice"),
    ([*BASE, "--candidat-activations", "x.npz"], "did you mean --candidate-activations?"),
    (["--preset", "google/siglip-base-patch16-22"], "did you mean google/siglip-base-patch16-224?"),
]


@covers("P17")
@pytest.mark.parametrize("argv, needle", EARLY, ids=[a[-1] for a, _ in EARLY])
def test_mistakes_are_reported_before_any_model_is_built(argv, needle, capsys, monkeypatch):
    """Was: a typo in the candidate's file or factory was reported after the reference and oracle had run (86 s),
    an unwritable --json after the whole run. Loading and the reference are booby-trapped here."""

    def trap(*args, **kwargs):
        raise AssertionError("work started before the mistake was reported")

    monkeypatch.setattr(importlib.import_module("siglip_scratch.parity.compare"), "resolve_weights", trap)
    monkeypatch.setattr(importlib.import_module("siglip_scratch.parity.compare"), "run_truth", trap)
    rc = parity_main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("cli", ["siglip_scratch.parity.cli", "siglip_scratch.convert.cli"])
def test_usage_errors_come_before_torch_is_imported(cli):
    """Was: every usage error waited for torch's import (21–27 s on a busy machine)."""
    code = f"import sys; from {cli} import main; rc = main(['--no-such-flag']); print(rc, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_the_failing_run_plot_is_readable(tmp_path, hf):
    """Was: the amplification panel's y labels overlapped (every minor tick labelled), its layer ticks fell on
    half layers, and the legends covered points. Rendered here and read back from the figure."""
    import matplotlib

    matplotlib.use("Agg")
    from siglip_scratch.parity import compare
    from siglip_scratch.parity.render import figure

    from . import ports_people_write as ports
    from .test_ports_people_write import SMALL

    report = compare(weights=_small(SMALL), candidate=ports.build("inplace", "scale", 2))
    assert not report.passed and report.amplification
    fig = figure(report)
    ax, amp = fig.axes[:2]
    assert all(float(t).is_integer() for t in amp.get_xticks()), amp.get_xticks()
    minor = [t.get_text() for t in amp.yaxis.get_minorticklabels() if t.get_text()]
    assert not minor, f"minor ticks labelled: {minor}"
    for axis in (ax, amp):
        box = axis.get_legend().get_window_extent(fig.canvas.get_renderer())
        inside = axis.get_window_extent(fig.canvas.get_renderer())
        assert box.x0 >= inside.x1 - 1, "the legend sits over the points"
    report.plot(tmp_path / "fail.png")
    assert (tmp_path / "fail.png").stat().st_size > 10_000


def _small(config):
    from siglip_scratch.modeling import synthetic_state_dict
    from siglip_scratch.parity import Weights

    return Weights(config, synthetic_state_dict(config, seed=0), "small (seed 0)", synthetic=True)


def test_convert_verify_says_where_it_is(tmp_path, capsys, hf):
    """Was: `siglip-convert --verify` silent for two minutes after a five-second conversion. Now a line per step on
    stderr, in a pipe too, and the harness's per-site-group lines inside the parity step."""
    from siglip_scratch import SiglipVisionModel
    from siglip_scratch.config import TINY_CONFIG
    from siglip_scratch.convert.cli import main as convert_main
    from siglip_scratch.parity.sites import SiteProgress

    SiglipVisionModel.from_config(TINY_CONFIG, seed=0).save_pretrained(tmp_path / "src")
    old, SiteProgress.every = SiteProgress.every, 0.0
    try:
        assert convert_main([str(tmp_path / "src"), str(tmp_path / "out"), "--verify"]) == 0
    finally:
        SiteProgress.every = old
    err = capsys.readouterr().err
    assert "verify: the output against the source" in err and "verify: the parity harness" in err, err
    assert "layer 1/2 done" in err, err
