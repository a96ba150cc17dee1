import json

import pytest

from siglip_scratch import PRESETS, ConfigError, SiglipVisionConfig, get_preset

from .catalogue import covers


def test_defaults_are_hugging_face_defaults():
    c = SiglipVisionConfig()
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == (768, 3072, 12, 12)
    assert (c.num_channels, c.image_size, c.patch_size) == (3, 224, 16)
    assert c.hidden_act == "gelu_pytorch_tanh"
    assert (c.layer_norm_eps, c.attention_dropout, c.vision_use_head) == (1e-6, 0.0, True)


def test_frozen():
    with pytest.raises(AttributeError):
        SiglipVisionConfig().hidden_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(hidden_size=770), "not divisible by num_attention_heads"),
        (dict(patch_size=0), "patch_size must be >= 1"),
        (dict(image_size=8, patch_size=16), "smaller than patch_size"),
        (dict(hidden_act="relu"), "unsupported hidden_act 'relu'"),
        (dict(hidden_size="768"), "hidden_size must be an integer"),
        (dict(num_hidden_layers=True), "num_hidden_layers must be an integer"),
        (dict(vision_use_head="yes"), "vision_use_head must be true or false"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps must be > 0"),
    ],
)
@covers("C04")
def test_invariants(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        SiglipVisionConfig(**kwargs)
    assert needle in str(e.value), str(e.value)


def test_gelu_exact_is_supported():
    assert SiglipVisionConfig(hidden_act="gelu").hidden_act == "gelu"


def test_hub_siglip_config_with_minimal_vision_config():
    # The hub's google/siglip-base-patch16-224 config.json: vision_config holds only patch_size.
    hub = {
        "architectures": ["SiglipModel"],
        "initializer_factor": 1.0,
        "model_type": "siglip",
        "text_config": {"model_type": "siglip_text_model"},
        "vision_config": {"model_type": "siglip_vision_model", "patch_size": 16},
        "transformers_version": "4.37.0.dev0",
    }
    assert SiglipVisionConfig.from_dict(hub) == get_preset("google/siglip-base-patch16-224")


def test_hub_so400m_config():
    hub = {
        "model_type": "siglip",
        "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27},
        "vision_config": {
            "hidden_size": 1152,
            "image_size": 384,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
        },
    }
    c = SiglipVisionConfig.from_dict(hub)
    assert c == get_preset("google/siglip-so400m-patch14-384")
    assert c.head_dim == 72 and c.num_patches == 729


def test_paligemma_config():
    hub = {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "projection_dim": 2048,
        "text_config": {"hidden_size": 2048, "model_type": "gemma", "num_hidden_layers": 18},
        "vision_config": {
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "num_image_tokens": 256,
            "patch_size": 14,
            "projection_dim": 2048,
            "projector_hidden_act": "gelu_fast",
            "vision_use_head": False,  # stated in the hub's config.json
        },
    }
    c = SiglipVisionConfig.from_dict(hub)
    assert c == get_preset("google/paligemma-3b-pt-224")
    assert c.image_size == 224 and c.vision_use_head is False
    # Absent, it means a head, as transformers reads it (PaliGemma's config has no default of its own).
    del hub["vision_config"]["vision_use_head"]
    assert SiglipVisionConfig.from_dict(hub).vision_use_head is True


def test_vision_config_flat_and_ignored_keys():
    c = SiglipVisionConfig.from_dict(
        {"model_type": "siglip_vision_model", "hidden_size": 64, "num_attention_heads": 4, "torch_dtype": "bf16"}
    )
    assert (c.hidden_size, c.num_attention_heads) == (64, 4)


@covers("C09")
def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError) as e:
        SiglipVisionConfig.from_dict({"model_type": "siglip", "vision_config": {"patch_size": "14"}}, source="x.json")
    msg = str(e.value)
    assert "patch_size" in msg and "x.json: vision_config" in msg, msg


def test_square_list_sizes_accepted_and_nonsquare_refused():
    assert SiglipVisionConfig.from_dict({"image_size": [384, 384]}).image_size == 384
    with pytest.raises(ConfigError, match="not square"):
        SiglipVisionConfig.from_dict({"image_size": [384, 256]})


def test_text_and_siglip2_refused():
    with pytest.raises(ConfigError, match="text-tower"):
        SiglipVisionConfig.from_dict({"model_type": "siglip_text_model"})
    with pytest.raises(ConfigError, match="NaFlex"):
        SiglipVisionConfig.from_dict({"model_type": "siglip2", "vision_config": {}})


def test_to_dict_is_complete_and_round_trips(tmp_path):
    c = get_preset("google/siglip-so400m-patch14-384")
    d = c.to_dict()
    assert d["model_type"] == "siglip_vision_model" and d["architectures"] == ["SiglipVisionModel"]
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_channels",
        "image_size",
        "patch_size",
        "hidden_act",
        "layer_norm_eps",
        "attention_dropout",
        "vision_use_head",
    ):
        assert field in d, field
    c.save_pretrained(tmp_path)
    assert SiglipVisionConfig.from_pretrained(tmp_path) == c
    assert SiglipVisionConfig.from_pretrained(tmp_path / "config.json") == c


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(OSError, match=r"no config\.json"):
        SiglipVisionConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SiglipVisionConfig.from_pretrained(tmp_path)


def test_transformers_reads_our_config(tmp_path, hf):
    c = get_preset("google/paligemma-3b-pt-224")
    c.save_pretrained(tmp_path)
    theirs = hf.SiglipVisionConfig.from_pretrained(tmp_path)
    for key, value in c.to_dict().items():
        if key in ("architectures", "model_type"):
            continue
        assert getattr(theirs, key) == value, key
    assert json.loads((tmp_path / "config.json").read_text())["vision_use_head"] is False


def test_presets_cover_the_required_ids():
    required = [
        "google/siglip-base-patch16-224",
        "google/siglip-base-patch16-256",
        "google/siglip-base-patch16-384",
        "google/siglip-base-patch16-512",
        "google/siglip-large-patch16-256",
        "google/siglip-large-patch16-384",
        "google/siglip-so400m-patch14-224",
        "google/siglip-so400m-patch14-384",
        "google/siglip-so400m-patch16-256-i18n",
        "google/paligemma-3b-pt-224",
    ]
    assert set(required) <= set(PRESETS)
    large = get_preset("google/siglip-large-patch16-384")
    assert (large.hidden_size, large.intermediate_size, large.num_hidden_layers, large.num_attention_heads) == (
        1024,
        4096,
        24,
        16,
    )
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("google/siglip-huge")
