"""The parity harness: planted bugs are blamed on the right site; reports, exit codes, candidates."""

from __future__ import annotations

import importlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from siglip_scratch import InputError, SiglipScratchError, SiglipVisionConfig, SiglipVisionModel
from siglip_scratch.modeling import synthetic_state_dict
from siglip_scratch.parity import Weights, assert_parity, compare, compile_rename
from siglip_scratch.parity.cli import main as parity_main

from . import planted_bugs as bugs
from .catalogue import covers
from .conftest import TINY

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "timm_like.py"
RENAME = REPO / "examples" / "timm_like_rename.json"

# 4 layers so "layer 2" has layers before and after it; big enough for realistic activations.
SMALL = SiglipVisionConfig(
    hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=16
)


@pytest.fixture(scope="module")
def small_weights() -> Weights:
    return Weights(SMALL, synthetic_state_dict(SMALL, seed=0), "small (seed 0)", synthetic=True)


def _planted(weights: Weights, plant) -> SiglipVisionModel:
    model = SiglipVisionModel.from_state_dict(weights.config, weights.state_dict)
    plant(model)
    return model


def test_unmodified_encoder_is_exact(small_weights, hf):
    for mode in ("propagated", "isolated", "both"):
        report = compare(weights=small_weights, mode=mode, depth="fine")
        assert report.passed, report.table()
        assert all(s.status == "exact" and s.max_abs == 0.0 for s in report.sites), report.table()
        assert "exact" in report.verdict and report.first_divergent_site is None


L = "vision_model.encoder.layers"
PLANTED = [
    # (bug, first site at fine depth in isolated mode, first site at coarse depth)
    ("missing residual in layer 2", bugs.missing_residual(2), f"{L}.2", f"{L}.2"),
    ("erf GELU in layer 2's MLP", bugs.erf_gelu(2), f"{L}.2.mlp", f"{L}.2"),
    ("LayerNorm eps 1e-5", bugs.all_layer_norm_eps(1e-5), f"{L}.0.layer_norm1", f"{L}.0"),
    ("q and k swapped in layer 2", bugs.q_k_swapped(2), f"{L}.2.self_attn", f"{L}.2"),
    ("head_dim scaling 1/d", bugs.head_dim_scaling(), f"{L}.0.self_attn", f"{L}.0"),
    ("exact GELU in the MAP head", bugs.erf_gelu_in_head(), "vision_model.head", "vision_model.head"),
]


@pytest.mark.parametrize("name, plant, fine_site, coarse_site", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_bug_is_blamed_on_its_site(name, plant, fine_site, coarse_site, small_weights, hf):
    fine = compare(weights=small_weights, candidate=_planted(small_weights, plant), mode="isolated", depth="fine")
    assert not fine.passed
    assert fine.first_divergent_site == fine_site, f"{name}:\n{fine.table()}"
    # Isolated mode keeps the blame local: nothing before the planted site fails.
    names = [s.name for s in fine.sites]
    assert all(s.passed for s in fine.sites[: names.index(fine_site)]), fine.table()

    coarse = compare(weights=small_weights, candidate=_planted(small_weights, plant), mode="isolated", depth="coarse")
    assert coarse.first_divergent_site == coarse_site, f"{name}:\n{coarse.table()}"

    propagated = compare(weights=small_weights, candidate=_planted(small_weights, plant), mode="propagated")
    assert not propagated.passed, f"{name}: propagated mode passed\n{propagated.table()}"


def test_isolated_blames_only_the_broken_layer(small_weights, hf):
    report = compare(
        weights=small_weights,
        candidate=_planted(small_weights, bugs.missing_residual(2)),
        mode="isolated",
        depth="coarse",
    )
    failing = [s.name for s in report.sites if not s.passed]
    assert failing == [f"{L}.2"], report.table()
    propagated = compare(
        weights=small_weights,
        candidate=_planted(small_weights, bugs.missing_residual(2)),
        mode="propagated",
        depth="coarse",
    )
    assert [s.name for s in propagated.sites if not s.passed][:3] == [f"{L}.2", f"{L}.3", "vision_model.post_layernorm"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_timm_like_candidate_passes_with_rename_and_adapter(dtype, small_weights, hf):
    rules = compile_rename(json.loads(RENAME.read_text()), str(RENAME))
    w = Weights(SMALL, {k: v.to(getattr(torch, dtype)) for k, v in small_weights.state_dict.items()}, "s", True)
    report = compare(weights=w, candidate=f"{EXAMPLE}:build", rename=rules, dtype=dtype, depth="fine")
    assert report.passed, report.table()
    assert report.missing_sites == [] and report.missing_keys == [] and report.unexpected_keys == []
    assert report.candidate["loaded_via"] == "load_hf_state_dict"
    if dtype == "float32":
        # Fused qkv rounds differently: within tolerance, not bit-exact.
        assert not all(s.exact for s in report.sites)


def test_timm_like_with_inference_off_reports_missing_sites(small_weights, hf):
    """rename=[] says "these names, no rules": nothing is inferred (test_infer.py covers inference)."""
    report = compare(weights=small_weights, candidate=f"{EXAMPLE}:build", rename=[])
    assert not report.passed
    # Without the map no module path is canonical; only the model's returned outputs are compared.
    compared = {s.name for s in report.sites if s.status != "missing"}
    assert compared == {"vision_model.post_layernorm", "vision_model.head"}, report.table()
    assert "MISSING" in report.table()


class _NoProbeHead(torch.nn.Module):
    """A hand-written candidate with our names but a head without `probe`: keys reported, rest compared."""

    def __init__(self, cfg: dict):
        super().__init__()
        inner = SiglipVisionModel(SiglipVisionConfig.from_dict(cfg))
        self.vision_model = inner.vision_model
        del self.vision_model.head.probe
        self.vision_model.head = None

    def forward(self, pixel_values):
        return self.vision_model(pixel_values)


def test_candidate_missing_keys_are_listed_and_other_sites_compared(small_weights, hf):
    report = compare(weights=small_weights, candidate=_NoProbeHead)
    assert report.unexpected_keys == sorted(k for k in small_weights.state_dict if k.startswith("vision_model.head."))
    assert report.missing_sites == ["vision_model.head"]
    assert all(s.exact for s in report.sites if s.name != "vision_model.head"), report.table()
    assert not report.passed


@covers("C05")
def test_nonfinite_values_are_a_site_status(small_weights, hf):
    # In the forward: the harness assigns the checkpoint's weights by name, which would undo a bad weight.
    model = SiglipVisionModel.from_state_dict(SMALL, small_weights.state_dict)
    mlp = model.vision_model.encoder.layers[1].mlp
    orig = mlp.forward
    mlp.forward = lambda x: orig(x) * float("inf")
    report = compare(weights=small_weights, candidate=model)
    assert report.first_divergent_site == f"{L}.1.mlp"
    site = next(s for s in report.sites if s.name == f"{L}.1.mlp")
    assert site.status == "nonfinite" and "candidate has NaN/Inf" in site.note
    assert "NONFINITE" in report.table() and not report.passed


@covers("P05")
def test_wrong_output_shape_names_site_and_shapes(small_weights, hf):
    model = SiglipVisionModel.from_state_dict(SMALL, small_weights.state_dict)
    post = model.vision_model.post_layernorm
    orig = post.forward
    post.forward = lambda x: orig(x)[:, :-1]
    report = compare(weights=small_weights, candidate=model)
    site = next(s for s in report.sites if s.name == "vision_model.post_layernorm")
    assert site.status == "shape" and "[1, 15, 96] vs reference [1, 16, 96]" in site.note.replace("2,", "1,")
    assert report.first_divergent_site == "vision_model.post_layernorm"


@covers("I12")
def test_nan_pixels_are_reported_not_compared(small_weights, hf):
    x = torch.zeros(1, 3, 64, 64)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="1 NaN/Inf"):
        compare(weights=small_weights, pixel_values=x)


def test_assert_parity_message_contains_table(small_weights, hf):
    assert_parity(weights=small_weights)
    with pytest.raises(AssertionError) as e:
        assert_parity(weights=small_weights, candidate=_planted(small_weights, bugs.erf_gelu(1)))
    assert "max|Δ|" in str(e.value) and f">>  {L}.1.mlp " in str(e.value)


def test_tolerance_override(small_weights, hf):
    cand = _planted(small_weights, bugs.erf_gelu(1))
    assert compare(weights=small_weights, candidate=cand, atol=1.0).passed
    report = compare(weights=small_weights, candidate=_planted(small_weights, bugs.erf_gelu(1)), atol=0, rtol=0)
    assert report.tolerance == {"atol": 0.0, "rtol": 0.0} and not report.passed


# -- CLI: JSON schema, markdown, exit codes -------------------------------------------------------
SITE_FIELDS = {"name", "max_abs", "mean_abs", "rel_l2", "cosine", "ref_max_abs", "passed"}
TOP_FIELDS = {
    "passed",
    "verdict",
    "reference",
    "candidate",
    "weights",
    "dtype",
    "device",
    "mode",
    "tolerance",
    "first_divergent_site",
    "missing_keys",
    "unexpected_keys",
    "sites",
}


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    SiglipVisionModel.from_config(TINY, seed=1).save_pretrained(folder)
    return folder


def test_cli_pass_json_and_markdown(tiny_folder, tmp_path, capsys, hf):
    rc = parity_main(
        ["--weights", str(tiny_folder), "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS: all 13 sites exact" in out
    # #23: a user's folder may hold random weights: never labelled "real"
    assert "(local weights, not a hub checkpoint)" in out and "(real)" not in out, out
    data = json.loads((tmp_path / "r.json").read_text())
    assert TOP_FIELDS <= set(data), sorted(TOP_FIELDS - set(data))
    assert set(data["reference"]) >= {"impl", "version", "attn"}
    assert data["weights"] == {"source": str(tiny_folder), "synthetic": False, "kind": "real", "origin": "folder"}
    assert data["passed"] is True and data["first_divergent_site"] is None
    assert all(SITE_FIELDS <= set(s) for s in data["sites"])
    assert [s["name"] for s in data["sites"]][:2] == [
        "vision_model.embeddings",
        "vision_model.encoder.layers.0.layer_norm1",
    ]
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("### siglip-parity: ✅ PASS") and "| `vision_model.head` |" in md


def test_cli_fail_exit_1_with_marked_row(tmp_path, capsys, hf):
    (tmp_path / "buggy.py").write_text(
        "import siglip_scratch as s\n"
        "def build(cfg):\n"
        "    m = s.SiglipVisionModel(s.SiglipVisionConfig.from_dict(cfg))\n"
        "    m.vision_model.encoder.layers[1].mlp.approximate = 'none'\n"
        "    return m\n"
    )
    rc = parity_main(
        [
            "--preset",
            "google/siglip-base-patch16-224",
            "--candidate",
            f"{tmp_path / 'buggy.py'}:build",
            "--mode",
            "isolated",
            "--batch",
            "1",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1, out
    assert f">>  {L}.1.mlp " in out and "FAIL: first divergent site vision_model.encoder.layers.1.mlp" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is False and data["first_divergent_site"] == f"{L}.1.mlp"
    assert data["weights"]["synthetic"] is True


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--preset", "google/nope"], "unknown preset 'google/nope'"),
        ([], "give exactly one weights source"),
        (["--preset", "google/siglip-base-patch16-224", "--model", "x/y"], "got 2"),
        (["--preset", "google/siglip-base-patch16-224", "--candidate", "no_such_mod_xyz:f"], "cannot import"),
        (["--preset", "google/siglip-base-patch16-224", "--candidate", "json:dumps"], "not a torch.nn.Module"),
        (["--preset", "google/siglip-base-patch16-224", "--candidate", "nocolon"], "is not module.path:factory"),
        (["--preset", "google/siglip-base-patch16-224", "--dtype", "int8"], "unsupported dtype 'int8'"),
        (["--weights", "/nonexistent/folder"], "no such file or folder"),
        (["--preset", "google/siglip-base-patch16-224", "--device", "foo"], "unknown device 'foo'"),
        (["--preset", "google/siglip-base-patch16-224", "--device", "meta"], "device type 'meta' cannot run"),
        (["--preset", "google/siglip-base-patch16-224", "--device", "tpu"], "unknown device 'tpu'"),
        (["--preset", "google/siglip-base-patch16-224", "--rename", "x.json"], "no --candidate was given"),
        (["--preset", "google/siglip-base-patch16-224", "--allow-unloaded", "x"], "no --candidate was given"),
        (["--check-golden", "--weights", "w"], "would ignore --weights"),
        (["--preset", "google/siglip-base-patch16-224", "--plot", "out.txt"], "cannot tell the plot format"),
        (["--preset", "google/siglip-base-patch16-224", "--json", "/tmp"], "is a folder, not a file"),
    ],
)
@covers("P01", "P02", "P06")
def test_cli_usage_errors_exit_2_one_line(argv, needle, capsys, hf):
    rc = parity_main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


@covers("P03", "P04")
def test_cli_rename_errors(tmp_path, capsys, hf):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "badre.json").write_text('{"rename": [["blocks\\\\.(\\\\d+", "x"]]}')
    (tmp_path / "badgroup.json").write_text('{"rename": [["blocks", "\\\\1"]]}')
    for name, needle in (("bad.json", "not valid JSON"), ("badre.json", "does not compile"), ("badgroup", "group 1")):
        path = tmp_path / (name if name.endswith(".json") else name + ".json")
        rc = parity_main(
            ["--preset", "google/siglip-base-patch16-224", "--candidate", f"{EXAMPLE}:build", "--rename", str(path)]
        )
        err = capsys.readouterr().err
        assert rc == 2 and needle in err, err


def test_cli_as_subprocess_no_traceback(tmp_path):
    exe = shutil.which("siglip-parity") or str(Path(sys.executable).parent / "siglip-parity")
    proc = subprocess.run([exe, "--preset", "google/siglip-nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: unknown preset")


@covers("P08")
def test_plot_without_matplotlib_is_a_clear_error(tiny_folder, tmp_path, capsys, monkeypatch, hf):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = parity_main(["--weights", str(tiny_folder), "--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert rc == 2 and 'pip install "siglip-scratch[plot]"' in err, err


def test_plot_is_written(tiny_folder, tmp_path, hf):
    import matplotlib  # noqa: F401  (in [dev] and the 4.57 venv: never skipped)

    assert parity_main(["--weights", str(tiny_folder), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_golden_detects_a_moved_reference(monkeypatch, capsys, hf):
    from siglip_scratch.parity import golden

    assert golden.run_golden(["google/siglip-base-patch16-224"], update=False), capsys.readouterr().out
    real = golden.fingerprint

    def moved(preset):
        fp = real(preset)
        site = fp["sites"]["vision_model.encoder.layers.5"]
        site["samples"] = [float.hex(float.fromhex(v) * (1 + 1e-3)) for v in site["samples"]]
        return fp

    monkeypatch.setattr(golden, "fingerprint", moved)
    assert not golden.run_golden(["google/siglip-base-patch16-224"], update=False)
    assert "vision_model.encoder.layers.5" in capsys.readouterr().out


@pytest.mark.parametrize("stat", ["max_abs", "sum"])
def test_golden_compares_every_recorded_statistic(stat, monkeypatch, capsys, hf):
    """The 32 samples unchanged, one summary statistic moved: still MOVED."""
    from siglip_scratch.parity import golden

    real = golden.fingerprint

    def moved(preset):
        fp = real(preset)
        site = fp["sites"]["vision_model.encoder.layers.3"]
        site[stat] += 1.0 if stat == "max_abs" else 1e3 * math.prod(site["shape"]) * site["max_abs"] * 1e-5
        return fp

    monkeypatch.setattr(golden, "fingerprint", moved)
    assert not golden.run_golden(["google/siglip-base-patch16-224"], update=False)
    out = capsys.readouterr().out
    assert (
        "vision_model.encoder.layers.3" in out and "MOVED" in out and ("max|x|" if stat == "max_abs" else "sum") in out
    )


@pytest.mark.parametrize("form", ["path", "dict", "pairs", "compiled"])
def test_rename_is_taken_in_every_form_users_write(form, small_weights, hf):
    """compare(rename=...) takes the map file, its JSON as a dict, or (regex, replacement) pairs."""
    spec = json.loads(RENAME.read_text())
    rename = {
        "path": str(RENAME),
        "dict": spec,
        "pairs": [tuple(rule) for rule in spec["rename"]],
        "compiled": compile_rename(spec, str(RENAME)),
    }[form]
    report = compare(weights=small_weights, candidate=f"{EXAMPLE}:build", rename=rename, depth="coarse")
    assert report.passed and report.missing_sites == [], report.table()


@pytest.mark.parametrize(
    "rename, needle",
    [
        ([("^blocks", "x", "extra")], "rule 0 is not a (regex, replacement) pair"),
        ([("(", "x")], "does not compile"),
        ([("^a$", "\\\\2")], "group"),
        ({"rules": []}, "rename map must be"),
        (42, "rename must be a path"),
        ("/no/such/map.json", "no rename map found"),
    ],
)
def test_bad_rename_fails_before_any_weights_are_read(rename, needle):
    with pytest.raises(SiglipScratchError) as exc:  # InputError, or SourceError for the missing file
        compare(weights="/no/such/weights", candidate=f"{EXAMPLE}:build", rename=rename)
    assert needle in str(exc.value), str(exc.value)


BEFORE_ANY_WORK = [
    (["--device", "foo"], "unknown device 'foo'"),
    (["--device", "meta"], "device type 'meta' cannot run"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "int8"], "unsupported dtype 'int8'"),
    (["--rename", "x.json"], "no --candidate was given"),
    (["--allow-unloaded", "x"], "no --candidate was given"),
    (["--plot", "out.txt"], "cannot tell the plot format"),
    (["--json", "/tmp"], "is a folder, not a file"),
    (["--markdown", "/no/such/dir/r.md"], "output folder does not exist"),
    (["--candidate", f"{EXAMPLE}:build", "--rename", "/no/such/map.json"], "no rename map found"),
    (["--candidate", f"{EXAMPLE}:build", "--skip-site", "("], "does not compile"),
    (["--mode", "sideways"], "invalid choice"),
]


@pytest.mark.parametrize("argv, needle", BEFORE_ANY_WORK, ids=[" ".join(a) for a, _ in BEFORE_ANY_WORK])
def test_cli_argument_errors_return_before_any_weights_are_read(argv, needle, capsys, monkeypatch):
    """One line on stderr, exit 2, no traceback, and not a byte of weights read (loading is booby-trapped)."""
    compare_module = importlib.import_module("siglip_scratch.parity.compare")

    def trap(*args, **kwargs):
        raise AssertionError("weights were loaded before the argument error was reported")

    monkeypatch.setattr(compare_module, "resolve_weights", trap)
    rc = parity_main(["--preset", "google/siglip-base-patch16-224", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err


def test_every_flag_is_described_with_its_default():
    """--help of both CLIs (and inspect): every option has a help text; options with a default say it."""
    from siglip_scratch.convert.cli import build_parser as convert_parser
    from siglip_scratch.parity.cli import build_inspect_parser, build_parser

    for parser in (build_parser(), build_inspect_parser(), convert_parser()):
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{parser.prog} {'/'.join(action.option_strings) or action.dest} has no help"
            default = action.default
            if action.option_strings and default not in (None, False, [], "==SUPPRESS=="):
                assert "default" in action.help or str(default) in action.help, (
                    f"{parser.prog} {action.option_strings[0]} does not say its default {default!r}"
                )


def test_range_scan_names_where_float16_would_overflow_even_in_a_float32_run(small_weights, hf):
    """A float32 run whose layer-1 MLP output exceeds 65504 (fc2 scaled ×3e4): the run passes (it is
    float32 and exact) and the report names that site as where float16 would overflow."""
    key = "vision_model.encoder.layers.1.mlp.fc2.weight"
    state = {**small_weights.state_dict, key: small_weights.state_dict[key] * 3e4}
    report = compare(weights=Weights(SMALL, state, "scaled", True), mode="propagated", depth="fine")
    assert report.passed, report.table()
    site = "vision_model.encoder.layers.1.mlp"
    assert report.fp16_overflow_site == site, report.ranges
    note = next(n for n in report.notes if n.startswith("float16 would overflow at"))
    assert note.startswith(f"float16 would overflow at {site}: max |x| "), note
    assert note in report.table() and json.loads(report.to_json())["fp16_overflow_site"] == site
    before = [r for r in report.ranges if r["site"] in ("vision_model.embeddings", "vision_model.encoder.layers.0")]
    assert before and all(r["flag"] is None and r["fp16_headroom"] > 8 for r in before), before
    normal = compare(weights=small_weights, mode="propagated", depth="coarse")
    assert normal.fp16_overflow_site is None and not any(r["flag"] for r in normal.ranges), normal.ranges


def test_range_scan_in_a_float16_run_and_quiet_on_synthetic_presets(small_weights, hf):
    """float16: a planted large-activation channel (one fc2 output row ×1e5 in layer 2) overflows the
    reference itself; the scan names that site. The synthetic presets flag nothing."""
    key = "vision_model.encoder.layers.2.mlp.fc2.weight"
    w = small_weights.state_dict[key].clone()
    w[5] *= 1e5  # one channel, past float16
    state = {k: v.half() for k, v in {**small_weights.state_dict, key: w}.items()}
    report = compare(weights=Weights(SMALL, state, "channel", True), dtype="float16", mode="propagated")
    assert report.fp16_overflow_site == "vision_model.encoder.layers.2.mlp", report.ranges
    assert any(n.startswith("float16 would overflow at vision_model.encoder.layers.2.mlp") for n in report.notes)
    quiet = compare(preset="google/siglip-base-patch16-224", mode="propagated", depth="fine", batch=1)
    flagged = [r for r in quiet.ranges if r["flag"]]
    assert quiet.passed and not flagged, flagged  # so400m-384: tests/test_slow.py
