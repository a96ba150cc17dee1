"""SigLIP 2 NaFlex: our encoder and processor against transformers' own `Siglip2VisionModel` and
`Siglip2ImageProcessor`, bit for bit, on real NaFlex inputs (non-square images of several aspect
ratios, several ``max_num_patches``, mixed in one padded batch). Runs under 5.x (`make test`) and 4.57.6
(`make test-457`), whose arithmetic differs (the `arithmetic` switch; a test shows the switch matters).
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

from siglip_scratch import (
    ConfigError,
    InputError,
    Siglip2ImageProcessor,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    load_config,
)
from siglip_scratch.modeling import synthetic_state_dict

from .catalogue import covers
from .conftest import assert_exact, max_abs

# Structure-true, small: head_dim 16, patch 8 (192 values a patch), an 8x8 position table resized per image.
CFG = Siglip2VisionConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, patch_size=8, num_patches=64
)
# (height, width): wide, tall, small, large, square, very wide: more than 4 aspect ratios, both ways.
SIZES = [(180, 320), (410, 150), (45, 61), (700, 1000), (224, 224), (40, 500)]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def _major(hf) -> int:
    return int(hf.__version__.split(".")[0])


def _arithmetic(hf) -> str:
    return "5" if _major(hf) >= 5 else "4.57"


def _transparency(hf) -> str:
    return "white" if _major(hf) >= 5 else "drop"


def _reference(hf, cfg: Siglip2VisionConfig, state: dict, attn: str):
    hcfg = hf.Siglip2VisionConfig(
        **{k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")}
    )
    ref = hf.Siglip2VisionModel._from_config(hcfg, attn_implementation=attn).eval()
    wrapped = hasattr(ref, "vision_model")  # 4.57 keeps the `vision_model.` wrapper, 5.x is flat
    ref.load_state_dict(
        {(k if wrapped else k.removeprefix("vision_model.")): v for k, v in state.items()}, strict=True, assign=True
    )
    return ref


def _hf_processor(hf, max_num_patches: int, patch_size: int):
    cls = getattr(hf, "Siglip2ImageProcessorPil", None) or hf.Siglip2ImageProcessor  # 4.57: the PIL one
    return cls(max_num_patches=max_num_patches, patch_size=patch_size, do_convert_rgb=True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_num_patches", [64, 100, 144, 256])
def test_encoder_is_bit_identical_to_transformers(hf, attn, max_num_patches):
    """Six images of different aspect ratios in one batch: each gets its own grid (spatial_shapes), the rest
    of its rows are padding. Every output, padding rows included, and the pooled output are identical."""
    state = synthetic_state_dict(CFG, seed=1)
    ours = Siglip2VisionModel.from_state_dict(CFG, state, attn_implementation=attn).set_arithmetic(_arithmetic(hf))
    ref = _reference(hf, CFG, state, attn)
    inputs = Siglip2ImageProcessor(patch_size=8, max_num_patches=max_num_patches)(_images())
    shapes = inputs["spatial_shapes"].tolist()
    assert len({h / w for h, w in shapes}) >= 4 and not inputs["pixel_attention_mask"].all(), shapes
    with torch.inference_mode():
        a = ours(**inputs)
        b = ref(**inputs)
    what = f"{attn}, max_num_patches {max_num_patches}, shapes {shapes}"
    assert_exact(a.last_hidden_state, b.last_hidden_state, f"last_hidden_state ({what})")
    assert_exact(a.pooler_output, b.pooler_output, f"pooler_output ({what})")


def test_unpadded_batch_and_bfloat16_are_bit_identical(hf):
    """No padding at all (transformers 5 then passes no mask), and a bfloat16 run."""
    state = synthetic_state_dict(CFG, seed=2)
    square = [Image.fromarray(np.full((64, 64, 3), i * 40, np.uint8)) for i in range(2)]
    inputs = Siglip2ImageProcessor(patch_size=8, max_num_patches=64)(square)
    assert inputs["pixel_attention_mask"].all()
    for dtype in (torch.float32, torch.bfloat16):
        typed = {k: v.to(dtype) for k, v in state.items()}
        ours = Siglip2VisionModel.from_state_dict(CFG, typed).set_arithmetic(_arithmetic(hf))
        ref = _reference(hf, CFG, typed, "sdpa")
        for batch in (inputs, Siglip2ImageProcessor(patch_size=8, max_num_patches=100)(_images()[:3])):
            x = {**batch, "pixel_values": batch["pixel_values"].to(dtype)}
            with torch.inference_mode():
                assert_exact(ours(**x).pooler_output, ref(**x).pooler_output, f"pooled {dtype}")


def test_the_other_versions_arithmetic_is_not_bit_identical(hf):
    """Why `arithmetic` exists: 5.x resizes the position grid with one matmul, 4.57 with F.interpolate,
    and masks differently; with the other version's arithmetic the outputs differ (by float32 rounding)."""
    state = synthetic_state_dict(CFG, seed=1)
    other = "4.57" if _arithmetic(hf) == "5" else "5"
    ours = Siglip2VisionModel.from_state_dict(CFG, state, attn_implementation="eager").set_arithmetic(other)
    ref = _reference(hf, CFG, state, "eager")
    inputs = Siglip2ImageProcessor(patch_size=8, max_num_patches=100)(_images())
    with torch.inference_mode():
        d = max_abs(ours(**inputs).last_hidden_state, ref(**inputs).last_hidden_state)
    assert 0 < d < 1e-4, d


@pytest.mark.parametrize("max_num_patches", [256, 576, 784, 1024])
def test_processor_equals_transformers(hf, max_num_patches):
    """Non-square images both ways, small, large, RGBA and grayscale, patch 16 as the hub checkpoints."""
    images = _images()
    rng = np.random.default_rng(1)
    images.append(Image.fromarray(rng.integers(0, 256, (200, 260, 4), dtype=np.uint8), "RGBA"))
    images.append(Image.fromarray(rng.integers(0, 256, (230, 170), dtype=np.uint8), "L"))
    theirs = _hf_processor(hf, max_num_patches, 16)(images=images, return_tensors="pt")
    ours = Siglip2ImageProcessor(max_num_patches=max_num_patches, transparency=_transparency(hf))(images)
    assert torch.equal(ours["spatial_shapes"], theirs["spatial_shapes"].long()), (
        ours["spatial_shapes"],
        theirs["spatial_shapes"],
    )
    assert torch.equal(ours["pixel_attention_mask"], theirs["pixel_attention_mask"].to(torch.int32))
    d = max_abs(ours["pixel_values"], theirs["pixel_values"])
    assert d <= 1e-6, f"pixel_values differ by {d:.3e} (max_num_patches {max_num_patches})"


@pytest.mark.parametrize("whole", [False, True], ids=["Siglip2VisionModel", "Siglip2Model"])
def test_loads_what_transformers_saves(hf, tmp_path, whole):
    """Folders written by transformers' own save_pretrained (this venv's version): strict load, exact output."""
    torch.manual_seed(0)
    vision = {k: v for k, v in CFG.to_dict().items() if k not in ("architectures", "model_type")}
    if whole:
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
        model = hf.Siglip2Model(hf.Siglip2Config(vision_config=vision, text_config=text)).eval()
        tower = model.vision_model
    else:
        model = tower = hf.Siglip2VisionModel(hf.Siglip2VisionConfig(**vision)).eval()
    model.save_pretrained(tmp_path)
    ours = Siglip2VisionModel.from_pretrained(tmp_path).set_arithmetic(_arithmetic(hf))
    assert ours.config == CFG
    inputs = Siglip2ImageProcessor(patch_size=8, max_num_patches=100)(_images())
    if "pixel_attention_mask" not in inspect.signature(tower.forward).parameters:  # 4.57's inner transformer
        inputs_hf = {**inputs, "attention_mask": inputs["pixel_attention_mask"]}
        del inputs_hf["pixel_attention_mask"]
    else:
        inputs_hf = inputs
    with torch.inference_mode():
        want = tower(**inputs_hf)
        got = ours(**inputs)
    assert_exact(got.last_hidden_state, want.last_hidden_state, "last_hidden_state after save_pretrained")
    assert_exact(got.pooler_output, want.pooler_output, "pooler_output after save_pretrained")
    assert isinstance(load_config(json.loads((tmp_path / "config.json").read_text())), Siglip2VisionConfig)


def test_our_save_is_what_transformers_loads(hf, tmp_path):
    ours = Siglip2VisionModel.from_config(CFG, seed=3).set_arithmetic(_arithmetic(hf))
    ours.save_pretrained(tmp_path)
    theirs, info = hf.Siglip2VisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    inputs = Siglip2ImageProcessor(patch_size=8, max_num_patches=64)(_images()[:2])
    with torch.inference_mode():
        assert_exact(ours(**inputs).pooler_output, theirs.eval()(**inputs).pooler_output, "pooled after our save")


@covers("I13")
def test_bad_inputs_are_one_line_errors():
    model = Siglip2VisionModel.from_config(CFG, seed=0)
    inputs = Siglip2ImageProcessor(patch_size=8, max_num_patches=64)(_images()[:2])
    bad_mask = inputs["pixel_attention_mask"].clone()
    bad_mask[0, -1] = 1 - bad_mask[0, -1]
    cases = [
        ({**inputs, "pixel_values": inputs["pixel_values"][..., :-1]}, "flattened 8x8 patches"),
        ({**inputs, "pixel_attention_mask": bad_mask}, "pixel_attention_mask marks"),
        ({**inputs, "spatial_shapes": torch.tensor([[9, 9], [1, 1]])}, "does not fit 64 patches"),
        ({**inputs, "spatial_shapes": inputs["spatial_shapes"].float()}, "spatial_shapes must be integer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            model(**kwargs)


@covers("C11")
def test_the_two_towers_keep_their_configs_apart():
    with pytest.raises(ConfigError, match="load it with Siglip2VisionModel"):
        SiglipVisionConfig.from_dict({"model_type": "siglip2_vision_model"})
    with pytest.raises(InputError, match="SiglipVisionModel takes a SiglipVisionConfig"):
        SiglipVisionModel(CFG)
    with pytest.raises(ConfigError, match="num_patches 200 is not a square"):
        Siglip2VisionConfig(num_patches=200)
    naflex = load_config({"model_type": "siglip2", "vision_config": {"num_patches": 576, "patch_size": 16}})
    assert naflex == Siglip2VisionConfig(num_patches=576)
    assert isinstance(load_config({"model_type": "siglip", "vision_config": {}}), SiglipVisionConfig)


# -- the converter ---------------------------------------------------------------------------------------
def _siglip2_model(hf, text_vocab: int = 100):
    torch.manual_seed(0)
    vision = {k: v for k, v in CFG.to_dict().items() if k not in ("architectures", "model_type")}
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=text_vocab)
    return hf.Siglip2Model(hf.Siglip2Config(vision_config=vision, text_config=text)).eval()


@pytest.mark.parametrize("with_processor", [True, False])
def test_converter_makes_a_vision_folder_transformers_loads(hf, tmp_path, capsys, with_processor):
    """A Siglip2Model saved by this venv's transformers (5.x under make test, 4.57.6 under make test-457):
    the output is vision-only, `transformers.Siglip2VisionModel` loads it with no missing/unexpected keys,
    and --verify compares both towers bit for bit on a padded batch of three aspect ratios."""
    from siglip_scratch.convert.cli import main as convert_main

    model = _siglip2_model(hf)
    model.save_pretrained(tmp_path / "src")
    if with_processor:
        _hf_processor(hf, 100, 8).save_pretrained(tmp_path / "src")
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "out"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "SigLIP 2 NaFlex" in out and "PASS (max |Δ| 0" in out, out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "siglip2_vision_model" and config["num_patches"] == CFG.num_patches
    pre = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert (pre["max_num_patches"], pre["patch_size"]) == ((100, 8) if with_processor else (256, 8)), pre
    theirs, info = hf.Siglip2VisionModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    processor = Siglip2ImageProcessor.from_pretrained(tmp_path / "out")
    inputs = processor(_images())
    ours = Siglip2VisionModel.from_pretrained(tmp_path / "out").set_arithmetic(_arithmetic(hf))
    with torch.inference_mode():
        assert_exact(ours(**inputs).pooler_output, theirs.eval()(**inputs).pooler_output, "pooled after conversion")


def test_converter_planted_tensor_fails_verify(hf, tmp_path, capsys):
    """--verify is not a rubber stamp: an output whose tower differs from transformers' fails it."""
    from siglip_scratch.convert.verify import verify_output

    ours = Siglip2VisionModel.from_config(CFG, seed=4)
    ours.save_pretrained(tmp_path / "ok")
    ok, text = verify_output(tmp_path / "ok")
    assert ok, text
    # A NaN weight: both towers go non-finite, which is never "bit-identical".
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "ok" / "model.safetensors")
    state["vision_model.encoder.layers.1.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "ok" / "model.safetensors"), metadata={"format": "pt"})
    ok, text = verify_output(tmp_path / "ok")
    assert not ok and "FAIL" in text, text


# -- the parity harness on NaFlex ---------------------------------------------------------------------------
def _weights():
    from siglip_scratch.parity import Weights

    return Weights(CFG, synthetic_state_dict(CFG, seed=0), "naflex small (seed 0)", synthetic=True)


def _planted(plant) -> Siglip2VisionModel:
    from siglip_scratch.parity.reference import naflex_arithmetic

    model = Siglip2VisionModel.from_state_dict(CFG, _weights().state_dict).set_arithmetic(naflex_arithmetic())
    plant(model)
    return model


def _resize_with(mode: str, antialias: bool):
    """A port's position resize: per image through F.interpolate with this mode/antialias (float32)."""

    def plant(model):
        emb = model.vision_model.embeddings

        def resized(shapes, length):
            table = emb.position_embedding.weight
            g, dim = emb.grid, table.shape[-1]
            grid = table.reshape(g, g, dim).permute(2, 0, 1).unsqueeze(0)
            out = torch.zeros(len(shapes), length, dim, dtype=table.dtype)
            for i, (h, w) in enumerate(shapes.tolist()):
                r = torch.nn.functional.interpolate(
                    grid, size=(h, w), mode=mode, align_corners=False, antialias=antialias
                )
                out[i, : h * w] = r.reshape(dim, h * w).t()
            return out

        emb.resized_positions = resized

    return plant


def _ignore_mask(path: str):
    def plant(model):
        module = model.get_submodule(path)
        forward = module.forward
        module.forward = lambda x, mask=None: forward(x, None)

    return plant


@pytest.mark.parametrize(
    ("bug", "plant", "site", "cause"),
    [
        (
            "bicubic resize",
            _resize_with("bicubic", True),
            "vision_model.embeddings",
            "position grid resized bicubic instead of bilinear",
        ),
        (
            "no antialias",
            _resize_with("bilinear", False),
            "vision_model.embeddings",
            "position grid resized without antialias",
        ),
        (
            "mask ignored in the head",
            _ignore_mask("vision_model.head"),
            "vision_model.head",
            "padding not masked in the MAP head",
        ),
        (
            "mask ignored in layer 1",
            _ignore_mask("vision_model.encoder.layers.1.self_attn"),
            "vision_model.encoder.layers.1.self_attn",
            "padding not masked in the attention",
        ),
    ],
)
def test_naflex_planted_bugs_are_caught_and_named(hf, bug, plant, site, cause):
    from siglip_scratch.parity import compare

    report = compare(weights=_weights(), candidate=_planted(plant), mode="isolated", depth="fine", batch=4)
    assert not report.passed and report.first_divergent_site == site, report.table()
    assert report.diagnosis is not None and (report.diagnosis["likely_cause"] or "").startswith(cause), json.dumps(
        report.diagnosis, indent=1
    )
    assert report.reference["impl"] == "transformers.Siglip2VisionModel"
    assert len({tuple(s) for s in report.inputs["spatial_shapes"]}) == 4  # four different patch grids, one batch


def test_naflex_garbage_in_padding_passes_and_leaking_padding_fails(hf):
    """Padding rows are not measured: a candidate that writes 1e4 into every padding row of every layer
    passes; one whose attention lets padding into real rows (layer 1 ignores the mask) fails, propagated too."""
    from siglip_scratch.parity import compare

    def garbage(model):
        keep = {}
        model.register_forward_pre_hook(
            lambda m, a, kw: keep.__setitem__("k", kw["pixel_attention_mask"].bool()), with_kwargs=True
        )
        for layer in model.vision_model.encoder.layers:
            layer.register_forward_hook(lambda m, a, out: out.masked_fill(~keep["k"][..., None], 1e4))

    clean = compare(weights=_weights(), candidate=_planted(garbage), mode="both", depth="fine", batch=4)
    assert clean.passed, clean.table()
    leak = compare(
        weights=_weights(),
        candidate=_planted(_ignore_mask("vision_model.encoder.layers.1.self_attn")),
        mode="propagated",
        batch=4,
    )
    assert not leak.passed and leak.first_divergent_site.startswith("vision_model.encoder.layers.1"), leak.table()


def test_naflex_ours_passes_in_every_mode_and_dtype(hf):
    from siglip_scratch.parity import Weights, compare

    for dtype in ("float32", "bfloat16"):
        w = _weights()
        if dtype != "float32":
            w = Weights(CFG, {k: v.to(torch.bfloat16) for k, v in w.state_dict.items()}, w.source, synthetic=True)
        for mode in ("isolated", "propagated"):
            report = compare(weights=w, mode=mode, dtype=dtype, batch=3, attn="eager" if mode == "isolated" else "sdpa")
            assert report.passed, report.table()


@pytest.mark.parametrize("scanned", [False, True], ids=["blocks", "scanned"])
def test_big_vision_naflex_npz_converts_and_verifies(hf, tmp_path, capsys, scanned):
    """naflex_vit.py's layout (public in big_vision; no installable software writes it, so written here from
    its parameter shapes): a Dense stem (p·p·3, D) and an (n, n, D) position grid. The output loads in
    transformers.Siglip2VisionModel and equals the tower the arrays were made from, bit for bit."""
    from siglip_scratch.convert.cli import main as convert_main

    from .layouts import to_big_vision

    state = synthetic_state_dict(CFG, seed=5)
    extra = {"txt/Encoder_0/encoder_norm/scale": np.ones(4, np.float32), "t": np.ones(1), "b": np.ones(1)}
    np.savez(tmp_path / "naflex.npz", **to_big_vision(state, CFG, scanned=scanned, extra=extra))
    assert convert_main([str(tmp_path / "naflex.npz"), str(tmp_path / "out"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "big_vision_naflex computed natively" in out and "PASS (max |Δ| 0" in out, out
    assert Siglip2VisionConfig.from_pretrained(tmp_path / "out") == CFG
    want = Siglip2VisionModel.from_state_dict(CFG, state).set_arithmetic(_arithmetic(hf))
    got = Siglip2VisionModel.from_pretrained(tmp_path / "out").set_arithmetic(_arithmetic(hf))
    inputs = Siglip2ImageProcessor(patch_size=8, max_num_patches=64)(_images())
    with torch.inference_mode():
        assert_exact(got(**inputs).pooler_output, want(**inputs).pooler_output, "converted big_vision NaFlex tower")


def test_big_vision_naflex_wrong_table_row_fails_verify(hf, tmp_path, capsys, monkeypatch):
    """--verify computes the source natively: a converter row that reads the position grid column-major
    (a plausible port bug) produces a loadable folder, and verify names the position embedding."""
    from siglip_scratch.convert import tables
    from siglip_scratch.convert.cli import main as convert_main
    from siglip_scratch.convert.formats import big_vision_naflex

    from .layouts import to_big_vision

    state = synthetic_state_dict(CFG, seed=5)
    np.savez(tmp_path / "naflex.npz", **to_big_vision(state, CFG))
    bad = [
        tables.Row(r.target, r.sources, tables.one(lambda x: x.transpose(0, 1).reshape(-1, x.shape[-1])))
        if r.target.endswith("position_embedding.weight")
        else r
        for r in big_vision_naflex.TABLE
    ]
    monkeypatch.setattr(big_vision_naflex, "TABLE", bad)
    assert convert_main([str(tmp_path / "naflex.npz"), str(tmp_path / "out"), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "position_embedding" in out, out


@covers("C12")
def test_big_vision_naflex_with_patch_layernorms_is_refused(tmp_path, capsys):
    from siglip_scratch.convert.cli import main as convert_main

    from .layouts import to_big_vision

    arrays = to_big_vision(synthetic_state_dict(CFG, seed=5), CFG)
    arrays["img/patchln_pre/scale"] = np.ones(CFG.patch_dim, np.float32)
    np.savez(tmp_path / "naflex.npz", **arrays)
    assert convert_main([str(tmp_path / "naflex.npz"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "normalises its patches (img/patchln_pre/scale)" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@covers("P14")
def test_candidate_processor_refuses_naflex_in_one_line(hf, capsys):
    from siglip_scratch.parity.cli import main as parity_main

    argv = [
        "--preset",
        "google/siglip2-base-patch16-naflex",
        "--candidate-processor",
        "tests/processor_ports.py:faithful",
    ]
    assert parity_main(argv) == 2
    err = capsys.readouterr().err
    assert "judges fixed-resolution processors" in err and len(err.strip().splitlines()) == 1, err


def _naflex_library_cases():
    from siglip_scratch.parity.diagnose import VARIANTS

    L, last = "vision_model.encoder.layers", CFG.num_hidden_layers - 1
    where = {
        "naflex-embeddings": ["vision_model.embeddings"],
        "naflex-head": ["vision_model.head"],
        "naflex-attention": [f"{L}.0.self_attn", f"{L}.{last}.self_attn"],
        "naflex-layer": [f"{L}.0", f"{L}.{last}"],
    }
    return [
        pytest.param(site, desc, fn, id=f"{site.replace('vision_model.', '')}: {desc}")
        for kind, sites in where.items()
        for desc, fn in VARIANTS[kind]
        for site in sites
    ]


@pytest.mark.parametrize(("site", "desc", "variant"), _naflex_library_cases())
def test_every_naflex_variant_is_named_first_where_it_is_planted(hf, site, desc, variant):
    """Each NaFlex variant of the library, planted as the candidate's module (given the batch's mask and
    grids, as a port would have them), fails at its site in isolated mode and is named as the cause."""
    from siglip_scratch.parity import compare
    from siglip_scratch.parity.diagnose import Context

    def plant(model):
        ctx = {}
        model.register_forward_pre_hook(
            lambda m, a, kw: ctx.__setitem__(
                "c", Context(keep=kw["pixel_attention_mask"].bool(), spatial_shapes=kw["spatial_shapes"])
            ),
            with_kwargs=True,
        )
        module = model.get_submodule(site)
        module.forward = lambda x, *a, **k: variant(module, x, CFG, ctx["c"])

    report = compare(weights=_weights(), candidate=_planted(plant), mode="isolated", depth="fine", batch=4)
    # A layer that ignores the mask does so in its self-attention, the finer site, which is blamed first.
    expected = f"{site}.self_attn" if site.split(".")[-1].isdigit() else site
    assert not report.passed and report.first_divergent_site == expected, report.table()
    assert report.diagnosis["likely_cause"] == desc, json.dumps(report.diagnosis, indent=1)[:2000]


def test_processor_config_round_trip_and_defaults(tmp_path):
    """A preprocessor_config.json that states only the patch size keeps SigLIP 2's bilinear; ours round-trips;
    a wrong type is the shared one-line ConfigError."""
    assert Siglip2ImageProcessor.from_dict({"patch_size": 8}).resample == 2
    proc = Siglip2ImageProcessor(patch_size=14, max_num_patches=576, resample=3)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(proc.to_dict()))
    assert Siglip2ImageProcessor.from_pretrained(tmp_path) == proc
    with pytest.raises(ConfigError, match="do_rescale must be true or false"):
        Siglip2ImageProcessor.from_dict({"do_rescale": "yes"})


def _naflex_factory(cfg: dict) -> Siglip2VisionModel:
    """A user's factory: gets the config dict, returns a fresh (randomly initialised) NaFlex tower."""
    from siglip_scratch.parity.reference import naflex_arithmetic

    return Siglip2VisionModel(Siglip2VisionConfig.from_dict(cfg)).set_arithmetic(naflex_arithmetic())


def test_a_factory_built_naflex_candidate_loads_the_weights_and_inspects(hf):
    """The harness loads the shared weights into a factory-built NaFlex candidate (every site found by name),
    and `inspect` reports the same."""
    from siglip_scratch.parity import compare
    from siglip_scratch.parity.inspection import inspect_candidate

    report = compare(weights=_weights(), candidate=_naflex_factory, mode="isolated", depth="fine", batch=3)
    assert report.passed and report.unloaded_parameters == [], report.table()
    assert all(s.exact for s in report.sites), report.table()
    result = inspect_candidate(_naflex_factory, preset="google/siglip2-base-patch16-naflex")
    assert all(how == "by name" for _, _, how in result.sites), result.sites


def test_naflex_images_through_the_python_api_name_their_processor(hf, tmp_path):
    """Weights passed as a `Weights` object (no source to read a processor from) with image files: the
    NaFlex default processor makes the pixels, and the report names that same processor."""
    from siglip_scratch.parity import compare

    paths = []
    for i, im in enumerate(_images()[:3]):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    report = compare(weights=_weights(), images=paths, mode="isolated", depth="coarse")
    assert report.passed, report.table()
    assert report.inputs["processor"]["image_processor_type"] == "Siglip2ImageProcessor"
    assert report.inputs["processor"]["max_num_patches"] == CFG.num_patches


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_naflex_padding_leak_in_the_last_layer_fails_in_the_default_mode(hf, dtype):
    """The mask ignored in the deepest attention, default mode (both), float32 and bfloat16: fails at that
    layer; the same model with the mask kept passes."""
    from siglip_scratch.parity import Weights, compare
    from siglip_scratch.parity.reference import naflex_arithmetic

    w = _weights()
    w = Weights(CFG, {k: v.to(getattr(torch, dtype)) for k, v in w.state_dict.items()}, w.source, synthetic=True)
    last = f"vision_model.encoder.layers.{CFG.num_hidden_layers - 1}.self_attn"

    def model(leak: bool) -> Siglip2VisionModel:
        m = Siglip2VisionModel.from_state_dict(CFG, w.state_dict).set_arithmetic(naflex_arithmetic())
        if leak:
            _ignore_mask(last)(m)
        return m

    assert compare(weights=w, candidate=model(False), dtype=dtype, batch=4).passed
    report = compare(weights=w, candidate=model(True), dtype=dtype, batch=4)
    assert not report.passed and report.first_divergent_site == last, report.table()
