"""Loading and saving: strict keys, every layout we accept, round trips through transformers."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from siglip_scratch import CheckpointError, SiglipVisionModel, SourceError
from siglip_scratch.config import get_preset
from siglip_scratch.parity.reference import build_reference

from .catalogue import covers
from .conftest import TINY, assert_exact, pixels


def _outputs(model, cfg=TINY):
    with torch.inference_mode():
        return model(pixels(cfg, 2)).pooler_output


def test_save_pretrained_files(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert keys == set(tiny_model.state_dict())
    assert all(k.startswith("vision_model.") for k in keys)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "siglip_vision_model"


def test_round_trip_ours(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    loaded = SiglipVisionModel.from_pretrained(tmp_path)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert_exact(_outputs(loaded), _outputs(tiny_model), "pooler after round trip")


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_round_trip_is_exact_at_batch_one(tmp_path, layers, hf):
    """Was: save_pretrained wrote through safetensors' save_file, which pads the header to 8 bytes, so the data
    started wherever the header's length put it (base with 2 layers: byte 8 mod 64, 3 layers: 56). Loaded zero-copy
    (ours and transformers alike), a weight off a 16-byte boundary takes another MKL matrix-vector path, and the
    batch-1 pooler of the reloaded model differed from the saved model's by an ulp. The data is 64-byte aligned now."""
    cfg = get_preset("google/siglip-base-patch16-224").replace(num_hidden_layers=layers)
    model = SiglipVisionModel.from_config(cfg, seed=layers).eval()
    x = pixels(cfg, 1)
    with torch.inference_mode():
        want = model(x).pooler_output
    model.save_pretrained(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    assert start % 64 == 0, f"tensor data starts at byte {start}, not on a 64-byte boundary"
    ours = SiglipVisionModel.from_pretrained(tmp_path)
    theirs = hf.SiglipVisionModel.from_pretrained(tmp_path).eval()
    assert {p.data_ptr() % 64 for p in ours.parameters()} == {0}
    with torch.inference_mode():
        assert_exact(ours(x).pooler_output, want, f"ours reloaded, {layers} layer(s)")
        assert_exact(theirs(x).pooler_output, want, f"transformers loading our save, {layers} layer(s)")


def test_a_misaligned_file_computes_as_transformers_computes_it(tmp_path, hf):
    """Hub files come from safetensors' own writer, data 8-byte aligned. We map them zero-copy and so does
    transformers, so both see the same misaligned weights and agree bit for bit at batch 1, though both differ by an
    ulp from the weights in fresh memory. Should transformers start copying (aligning), this fails, and our loader
    must copy as well."""
    cfg = get_preset("google/siglip-base-patch16-224").replace(num_hidden_layers=1)
    model = SiglipVisionModel.from_config(cfg, seed=5).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "model.safetensors"
    for pad in range(0, 64, 8):  # find the metadata length that puts the data at byte 8 mod 16
        save_file(state, str(path), metadata={"format": "pt", "pad": "x" * pad})
        if (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 16 == 8:
            break
    else:
        pytest.fail("no metadata length put the data off a 16-byte boundary")
    cfg.save_pretrained(tmp_path)
    ours = SiglipVisionModel.from_pretrained(tmp_path)
    theirs = hf.SiglipVisionModel.from_pretrained(tmp_path).eval()
    x = pixels(cfg, 1)
    with torch.inference_mode():
        assert_exact(ours(x).pooler_output, theirs(x).pooler_output, "the same misaligned file in both")


def test_ours_to_transformers(tmp_path, tiny_model, hf):
    tiny_model.save_pretrained(tmp_path)
    theirs, info = hf.SiglipVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set()), info
    assert_exact(_outputs(theirs.eval()), _outputs(tiny_model), "transformers loading our folder")


def test_transformers_to_ours(tmp_path, tiny_model, hf):
    ref = build_reference(TINY, {k: v.clone() for k, v in tiny_model.state_dict().items()})
    ref.save_pretrained(tmp_path)
    ours = SiglipVisionModel.from_pretrained(tmp_path)
    assert_exact(_outputs(ours), _outputs(ref), "ours loading a transformers folder")


def test_flat_keys_load(tmp_path, tiny_model):
    flat = {k[len("vision_model.") :]: v for k, v in tiny_model.state_dict().items()}
    save_file(flat, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    TINY.save_pretrained(tmp_path)
    assert_exact(_outputs(SiglipVisionModel.from_pretrained(tmp_path)), _outputs(tiny_model), "flat layout")


def test_full_siglip_model_file_ignores_text_tower(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    state["text_model.embeddings.token_embedding.weight"] = torch.randn(10, 8)
    state["logit_scale"] = torch.ones(1)
    state["logit_bias"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "siglip", "vision_config": TINY.to_dict(), "text_config": {}})
    )
    assert_exact(_outputs(SiglipVisionModel.from_pretrained(tmp_path)), _outputs(tiny_model), "full SiglipModel")


def test_sharded_index_loads_only_vision_shards(tmp_path, tiny_model):
    state = tiny_model.state_dict()
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00003.safetensors": keys[:half], "model-00002-of-00003.safetensors": keys[half:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in ks})
    # A text-tower shard listed in the index but absent on disk: it must never be opened.
    weight_map["text_model.final_layer_norm.weight"] = "model-00003-of-00003.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    TINY.save_pretrained(tmp_path)
    assert_exact(_outputs(SiglipVisionModel.from_pretrained(tmp_path)), _outputs(tiny_model), "sharded")


def test_dtype_on_load(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    model = SiglipVisionModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _save(tmp_path, state, cfg=TINY):
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(tmp_path)


@covers("C01")
def test_missing_key_is_listed(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    del state["vision_model.encoder.layers.1.mlp.fc2.bias"]
    _save(tmp_path, state)
    with pytest.raises(CheckpointError) as e:
        SiglipVisionModel.from_pretrained(tmp_path)
    assert e.value.missing == ["vision_model.encoder.layers.1.mlp.fc2.bias"]
    assert "missing 1: vision_model.encoder.layers.1.mlp.fc2.bias" in str(e.value)


@covers("C02")
def test_unexpected_keys_are_listed_sorted(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    state["vision_model.zz.extra"] = torch.zeros(1)
    state["some.random.key"] = torch.zeros(1)
    _save(tmp_path, state)
    with pytest.raises(CheckpointError) as e:
        SiglipVisionModel.from_pretrained(tmp_path)
    assert e.value.unexpected == ["some.random.key", "vision_model.zz.extra"]


@covers("C03")
def test_wrong_shape_names_key_and_both_shapes(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    state["vision_model.post_layernorm.weight"] = torch.zeros(65)
    _save(tmp_path, state)
    with pytest.raises(CheckpointError) as e:
        SiglipVisionModel.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "vision_model.post_layernorm.weight: checkpoint [65] vs model [64]" in msg, msg


@covers("C08")
def test_config_that_disagrees_with_tensors(tmp_path, tiny_model):
    _save(tmp_path, tiny_model.state_dict(), cfg=TINY.replace(num_hidden_layers=3))
    with pytest.raises(CheckpointError, match="missing") as e:
        SiglipVisionModel.from_pretrained(tmp_path)
    assert "config.json belongs to these weights" in str(e.value)


@covers("C06")
def test_text_only_checkpoint(tmp_path):
    _save(tmp_path, {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4), "logit_scale": torch.ones(1)})
    with pytest.raises(CheckpointError, match="no SigLIP vision tower"):
        SiglipVisionModel.from_pretrained(tmp_path)


def test_missing_folder_and_wrong_file(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        SiglipVisionModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(SourceError, match="siglip-convert"):
        SiglipVisionModel.from_pretrained(tmp_path / "w.bin")


def test_from_state_dict_shares_storage(tiny_model):
    state = tiny_model.state_dict()
    other = SiglipVisionModel.from_state_dict(TINY, state)
    assert {p.data_ptr() for p in other.parameters()} == {p.data_ptr() for p in tiny_model.parameters()}


def test_timm_layout_given_to_from_pretrained_says_convert(tmp_path):
    from siglip_scratch.modeling import synthetic_state_dict

    from . import layouts

    state = synthetic_state_dict(TINY, seed=0)
    folder = tmp_path / "timm"
    folder.mkdir()
    save_file(layouts.to_timm(state, TINY), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(TINY.to_dict()))
    with pytest.raises(CheckpointError, match=r"timm SigLIP layout detected.*siglip-convert"):
        SiglipVisionModel.from_pretrained(folder)
