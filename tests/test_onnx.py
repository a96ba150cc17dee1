"""ONNX models as candidates (#15): graphs exported by torch.onnx from our encoder and from transformers'
own, judged site by site through onnxruntime (float32, both modes), and bugs planted in the graph named at
their site. onnxruntime and onnx are in the dev extra, so `make test` and CI run these."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from siglip_scratch import SiglipVisionConfig, SiglipVisionModel
from siglip_scratch.modeling import synthetic_state_dict
from siglip_scratch.parity import Weights, compare
from siglip_scratch.parity.cli import main as parity_main

from .catalogue import covers

CFG = SiglipVisionConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)


def _weights() -> Weights:
    return Weights(CFG, synthetic_state_dict(CFG, seed=0), "small (seed 0)", synthetic=True)


class _Outputs(torch.nn.Module):
    """What an export wraps: the tower under its hub path, returning plain tensors."""

    def __init__(self, tower: torch.nn.Module, path: str | None):
        super().__init__()
        if path:
            setattr(self, path, tower)
        else:
            self.inner = tower
        self.path = path or "inner"

    def forward(self, x):
        out = getattr(self, self.path)(x)
        return out.last_hidden_state, out.pooler_output


def _export(module: torch.nn.Module, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (torch.randn(2, 3, 32, 32),),
            str(path),
            dynamo=False,
            opset_version=20,
            input_names=["pixel_values"],
            output_names=["last_hidden_state", "pooler_output"],
            dynamic_axes={"pixel_values": {0: "batch"}},
        )
    return str(path)


def _ours_onnx(tmp_path) -> str:
    model = SiglipVisionModel.from_state_dict(CFG, _weights().state_dict)
    return _export(_Outputs(model.vision_model, "vision_model"), tmp_path / "ours.onnx")


def test_our_encoder_exported_to_onnx_passes_both_modes(tmp_path, hf):
    report = compare(weights=_weights(), candidate=_ours_onnx(tmp_path), depth="fine")
    assert report.passed, report.table()
    assert report.candidate["framework"] == "ONNX Runtime" and report.candidate["runtime"].startswith("onnxruntime ")
    assert len(report.candidate["site_values"]) == 18 and report.propagated_sites is not None


def test_transformers_model_exported_to_onnx_passes(tmp_path, hf):
    """transformers' own SiglipVisionModel, exported: 5.x's flat module paths (/embeddings/…) and 4.57's
    (/vision_model/…) both map to the canonical sites."""
    from siglip_scratch.parity.reference import build_reference

    reference = build_reference(
        CFG, {k: v.clone() for k, v in _weights().state_dict.items()}, attn_implementation="eager"
    )
    path = _export(_Outputs(reference, None), tmp_path / "hf.onnx")
    import onnx

    names = [n.name for n in onnx.load(path).graph.node]
    assert any(n.startswith("/inner/") for n in names), names[:5]
    rename = [["^inner\\.(vision_model\\.)?", "vision_model."]]
    report = compare(weights=_weights(), candidate=path, rename=rename, depth="fine")
    assert report.passed, report.table()


def _edit(path: str, out, edit) -> str:
    import onnx

    model = onnx.load(path)
    edit(model.graph)
    onnx.save(model, str(out))
    return str(out)


def test_a_swapped_gelu_in_the_graph_is_named_at_its_site(tmp_path, hf):
    def swap(graph):
        import onnx

        node = next(n for n in graph.node if n.name == "/vision_model/encoder/layers.1/mlp/Gelu")
        for a in node.attribute:
            if a.name == "approximate":
                a.CopyFrom(onnx.helper.make_attribute("approximate", "none"))

    path = _edit(_ours_onnx(tmp_path), tmp_path / "gelu.onnx", swap)
    report = compare(weights=_weights(), candidate=path, mode="isolated", depth="fine")
    assert not report.passed and report.first_divergent_site == "vision_model.encoder.layers.1.mlp", report.table()
    assert report.diagnosis["likely_cause"].startswith("the other GELU"), report.diagnosis


def test_a_scaled_matmul_in_the_graph_is_caught_at_its_site(tmp_path, hf):
    """One MatMul's output scaled by 1.001 (layer 2's fc2): no known bug, but the site is exact."""

    def scale(graph):
        import onnx
        from onnx import numpy_helper

        idx, node = next(
            (i, n) for i, n in enumerate(graph.node) if n.name == "/vision_model/encoder/layers.2/mlp/fc2/MatMul"
        )
        out = node.output[0]
        node.output[0] = out + "_unscaled"
        graph.initializer.append(numpy_helper.from_array(__import__("numpy").array(1.001, "float32"), "planted_scale"))
        graph.node.insert(
            idx + 1,
            onnx.helper.make_node(
                "Mul",
                [out + "_unscaled", "planted_scale"],
                [out],
                name="/vision_model/encoder/layers.2/mlp/fc2/PlantedMul",
            ),
        )

    path = _edit(_ours_onnx(tmp_path), tmp_path / "scaled.onnx", scale)
    report = compare(weights=_weights(), candidate=path, depth="fine")
    assert not report.passed and report.first_divergent_site == "vision_model.encoder.layers.2.mlp", report.table()
    assert report.diagnosis is not None and report.diagnosis["likely_cause"] is None, report.diagnosis
    assert not all(s.passed for s in report.propagated_sites)


@covers("P16")
def test_without_onnxruntime_the_flag_is_a_one_line_install_hint(tmp_path, capsys, monkeypatch, hf):
    path = _ours_onnx(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert parity_main(["--preset", "google/siglip-base-patch16-224", "--candidate", path]) == 2
    err = capsys.readouterr().err
    assert 'pip install "siglip-scratch[onnx]"' in err and len(err.strip().splitlines()) == 1, err


@covers("P16")
def test_onnx_candidate_in_bfloat16_is_refused(tmp_path, capsys, hf):
    path = _ours_onnx(tmp_path)
    assert parity_main(["--preset", "google/siglip-base-patch16-224", "--candidate", path, "--dtype", "bfloat16"]) == 2
    assert "runs in its graph's float32" in capsys.readouterr().err


def _export_dynamo(module: torch.nn.Module, path) -> str:
    """torch 2.13's default exporter: module paths only in each node's pkg.torch.onnx.name_scopes metadata."""
    import contextlib
    import io

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            (torch.randn(2, 3, 32, 32),),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=["last_hidden_state", "pooler_output"],
            dynamic_shapes=({0: "batch"},),
        )
        program.save(str(path))
    return str(path)


def test_dynamo_export_passes_with_no_flags(tmp_path, hf):
    """Was: exit 2, "no canonical site found in the graph's node names" (node_MatMul_6 carries no path; the scopes
    are in metadata), and the dynamic batch's Shape bookkeeping would have read as a second site input."""
    model = SiglipVisionModel.from_state_dict(CFG, _weights().state_dict)
    path = _export_dynamo(_Outputs(model.vision_model, "vision_model"), tmp_path / "dynamo.onnx")
    report = compare(weights=_weights(), candidate=path, depth="fine")
    assert report.passed, report.table()
    assert len(report.candidate["site_values"]) == 18, report.candidate["site_values"]
    assert parity_main(["--weights", str(_folder(tmp_path)), "--candidate", path]) == 0


def _folder(tmp_path):
    folder = tmp_path / "weights"
    if not folder.exists():
        SiglipVisionModel.from_state_dict(CFG, _weights().state_dict).save_pretrained(folder)
    return folder


def test_dynamo_export_with_a_planted_bug_fails_at_its_site(tmp_path, hf):
    model = SiglipVisionModel.from_state_dict(CFG, {k: v.clone() for k, v in _weights().state_dict.items()})
    fc2 = model.vision_model.encoder.layers[2].mlp.fc2
    with torch.no_grad():
        fc2.weight.mul_(1.001)
    path = _export_dynamo(_Outputs(model.vision_model, "vision_model"), tmp_path / "bug.onnx")
    report = compare(weights=_weights(), candidate=path, depth="fine")
    assert not report.passed and report.first_divergent_site.startswith("vision_model.encoder.layers.2.mlp"), (
        report.table()
    )


def test_legacy_export_with_deduplicated_initializers_passes(tmp_path, hf):
    """Was: exit 2, "cannot tell …layer_norm1's output and input": LayerNorms at their initial values (all ones,
    all zeros) share one initializer, which the exporter aliases through Identity nodes outside every scope."""
    state = {k: v.clone() for k, v in _weights().state_dict.items()}
    for k in state:
        if "layer_norm" in k or "layernorm" in k:
            state[k] = torch.ones_like(state[k]) if k.endswith("weight") else torch.zeros_like(state[k])
    w = Weights(CFG, state, "initial norms", synthetic=True)
    model = SiglipVisionModel.from_state_dict(CFG, {k: v.clone() for k, v in state.items()})
    path = _export(_Outputs(model.vision_model, "vision_model"), tmp_path / "dedup.onnx")
    import onnx

    assert any(n.op_type == "Identity" for n in onnx.load(path).graph.node), "the exporter no longer deduplicates"
    report = compare(weights=w, candidate=path, depth="fine")
    assert report.passed, report.table()


@covers("P18")
def test_a_static_batch_graph_is_a_one_line_error_with_the_fix(tmp_path, capsys, hf):
    model = SiglipVisionModel.from_state_dict(CFG, _weights().state_dict)
    path = tmp_path / "static.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Outputs(model.vision_model, "vision_model").eval(),
            (torch.randn(1, 3, 32, 32),),
            str(path),
            dynamo=False,
            opset_version=20,
            input_names=["pixel_values"],
        )
    rc = parity_main(["--weights", str(_folder(tmp_path)), "--candidate", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "batch is fixed at 1" in err and "--batch 1" in err and err.count("\n") == 1, err
    assert parity_main(["--weights", str(_folder(tmp_path)), "--candidate", str(path), "--batch", "1"]) == 0


def _optimum_export(folder, out) -> str:
    """`optimum-cli export onnx` as a user runs it (optimum-onnx 0.1, installed in .venv-457 beside transformers
    4.57.6: it pins transformers below 5), in the task it supports for a vision tower."""
    import subprocess

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "optimum.exporters.onnx",
            "--model",
            str(folder),
            "--task",
            "feature-extraction",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return str(out / "model.onnx")


def _require_optimum() -> None:
    import importlib.util
    import os

    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.exporters.onnx") is None:
        if os.environ.get("SIGLIP_REQUIRE_OPTIMUM"):
            pytest.fail("optimum-onnx is not installed: make test-457 installs it")
        pytest.skip("optimum-onnx not installed (make test-457 has it, beside transformers 4.57)")


def test_optimum_export_passes_with_no_flags_and_a_planted_gelu_is_named(tmp_path, hf):
    """#20: an optimum export (its own tracing of transformers' model, node names from the module paths) is judged
    with no flags; the same export of a config saying `hidden_act: gelu` (exact) fails at the first MLP, named."""
    _require_optimum()
    import json

    folder = _folder(tmp_path)
    path = _optimum_export(folder, tmp_path / "optimum")
    report = compare(weights=str(folder), candidate=path, depth="fine")
    assert report.passed, report.table()
    assert parity_main(["--weights", str(folder), "--candidate", path, "--quiet"]) == 0
    wrong = tmp_path / "wrong-config"
    SiglipVisionModel.from_state_dict(CFG, _weights().state_dict).save_pretrained(wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    bug = compare(weights=str(folder), candidate=_optimum_export(wrong, tmp_path / "optimum-bug"), depth="fine")
    assert not bug.passed and bug.first_divergent_site == "vision_model.encoder.layers.0.mlp", bug.table()
    assert (bug.diagnosis or {}).get("likely_cause", "").startswith("the other GELU"), bug.table()
