"""--image-features: judged up to what a VLM's language model receives (issue #21).

Every VLM here is built and saved by transformers itself (`vlm_fixtures.py`), under 5.x (`make test`) and 4.57.6
(`make test-457`). The truth each verdict is checked against is computed without the harness: the full VLM's own
``get_image_features`` read at its projector.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch.nn import functional as F

from siglip_scratch import SiglipVisionConfig
from siglip_scratch.parity import compare
from siglip_scratch.parity.cli import main as parity_main
from siglip_scratch.parity.vlm import projector_tensors
from siglip_scratch.vlm import SiglipImageFeatures, feature_path

from .catalogue import covers
from .conftest import assert_exact, require_transformers
from .vlm_fixtures import FAMILIES, build_vlm, projector_output, save_vlm

pytestmark = pytest.mark.transformers


def _v5(T) -> bool:
    return int(T.__version__.split(".")[0]) >= 5


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    """kind -> (transformers' model, its save_pretrained folder)."""
    T = require_transformers()
    out = {}
    for kind in FAMILIES:
        model = build_vlm(kind, T)
        out[kind] = (model, save_vlm(model, tmp_path_factory.mktemp(kind.replace(" ", "_"))))
    return out


def _ours(folder, T) -> SiglipImageFeatures:
    data = json.loads((folder / "config.json").read_text())
    vision = SiglipVisionConfig.from_dict(data)
    from siglip_scratch.parity.weights import resolve_weights

    w = resolve_weights(weights=folder)
    ours = SiglipImageFeatures.from_state_dict(
        vision, feature_path(data, vision), {**w.state_dict, **projector_tensors(folder)}
    )
    return ours.set_arithmetic("5" if _v5(T) else "4.57")


@pytest.mark.parametrize("kind", FAMILIES)
def test_our_features_equal_the_vlm_own_get_image_features(kind, vlms, hf):
    model, folder = vlms[kind]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    want = projector_output(model, kind, x)
    with torch.inference_mode():
        got = _ours(folder, hf)(x)
    assert_exact(got, want, f"{kind}: SiglipImageFeatures vs transformers' get_image_features")


@pytest.mark.parametrize("kind", FAMILIES)
def test_ours_passes_image_features_against_the_vlm(kind, vlms, hf):
    _, folder = vlms[kind]
    report = compare(weights=str(folder), image_features=True, depth="fine")
    names = [s.name for s in report.sites]
    assert names[-1] == "multi_modal_projector" and "vision_feature" in names, names
    assert report.reference["impl"].endswith(".get_image_features"), report.reference
    assert report.passed, report.table()
    assert all(s.status == "exact" for s in report.sites), report.table()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precisions_pass(dtype, vlms):
    for kind in ("PaliGemma", "Gemma 3", "LLaVA", "SmolVLM"):
        report = compare(weights=str(vlms[kind][1]), image_features=True, dtype=dtype, depth="coarse")
        assert report.passed, report.table()


# -- planted integration bugs: each fails at its site and is named --------------------------------------------
class Planted(SiglipImageFeatures):
    """Our features with one integration bug (``bug``), as ports have had them."""

    def __init__(self, vision, path, shapes, bug: str):
        n = path.layers[0]
        moved = {
            "layer-1": dataclasses.replace(path, layers=tuple(i - 1 for i in path.layers)),
            "layer+1": dataclasses.replace(path, layers=tuple(i + 1 for i in path.layers)),
            "post_layernorm": dataclasses.replace(path, post_layernorm=not path.post_layernorm),
            "cls": dataclasses.replace(path, strategy="default" if path.strategy == "full" else "full"),
        }.get(bug, path)
        assert moved.layers[0] <= vision.num_hidden_layers, (bug, n)
        super().__init__(vision, moved, shapes)
        self.bug = bug

    def vision_feature(self, pixel_values):
        if self.bug == "cls-added":  # a learned CLS token in front, as CLIP towers have
            feature = super().vision_feature(pixel_values)
            return torch.cat([feature.mean(1, keepdim=True), feature], dim=1)
        if self.bug == "map-head":
            tower = self.vision_model
            hidden = tower.embeddings(pixel_values)
            for layer in tower.encoder.layers:
                hidden = layer(hidden)
            return tower.head(tower.post_layernorm(hidden))[:, None]
        return super().vision_feature(pixel_values)

    def forward(self, pixel_values):
        x = self.vision_feature(pixel_values)
        p = self.multi_modal_projector
        if self.bug == "scale":
            return p(x) / math.sqrt(self.path.text_hidden_size)
        if self.bug == "transposed":  # LLaVA's square linear_2 read in the other layout
            h = F.gelu(p.linear_1(x))
            return F.linear(h, p.linear_2.weight.t(), p.linear_2.bias)
        if self.bug == "gemma-w":
            norm = p.mm_soft_emb_norm
            original = norm.forward
            norm.forward = lambda t: (
                t.float() * torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.float()
            ).type_as(t)
            try:
                return p(x)
            finally:
                norm.forward = original
        if self.bug == "shuffle":
            B, N, D = x.shape
            s = p.scale_factor
            return p.modality_projection(x.reshape(B, N // (s * s), D * s * s))
        return p(x)


PLANTED = [
    # (family, bug, the site it must fail at, words the likely cause must contain)
    ("LLaVA", "layer-1", "vision_feature", "off by one"),
    ("LLaVA", "layer+1", "vision_feature", "off by one"),
    ("PaliGemma", "layer-1", "vision_feature", "off by one"),
    ("LLaVA", "post_layernorm", "vision_feature", "post_layernorm applied"),
    ("PaliGemma", "post_layernorm", "vision_feature", "post_layernorm not applied"),
    ("PaliGemma", "map-head", "vision_feature", "MAP head"),
    ("PaliGemma", "cls", "vision_feature", "CLS token"),
    ("PaliGemma", "cls-added", "vision_feature", "a token added in front"),
    ("LLaVA", "cls", "vision_feature", "first token kept"),
    ("PaliGemma", "scale", "multi_modal_projector", "hidden_size**-0.5"),
    ("LLaVA", "transposed", "multi_modal_projector", "linear_2.weight transposed"),
    ("Gemma 3", "gemma-w", "multi_modal_projector.mm_soft_emb_norm", "w instead of 1 + w"),
    ("SmolVLM", "shuffle", "multi_modal_projector", "pixel shuffle"),
]


@covers("P22")
@pytest.mark.parametrize(("kind", "bug", "site", "words"), PLANTED, ids=[f"{k}-{b}" for k, b, _, _ in PLANTED])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planted_integration_bug_fails_at_its_site_and_is_named(kind, bug, site, words, dtype, vlms, hf):
    _, folder = vlms[kind]
    data = json.loads((folder / "config.json").read_text())
    vision = SiglipVisionConfig.from_dict(data)
    path = feature_path(data, vision)
    shapes = {k[len("multi_modal_projector.") :]: tuple(v.shape) for k, v in projector_tensors(folder).items()}
    report = compare(
        weights=str(folder),
        image_features=True,
        candidate=lambda config: Planted(vision, path, shapes, bug).set_arithmetic("5" if _v5(hf) else "4.57"),
        depth="fine" if site.endswith("norm") else "coarse",
        dtype=dtype,
    )
    assert not report.passed, report.table()
    d = report.diagnosis
    assert d is not None and d["site"] == site, (d, report.table())
    assert d["likely_cause"] and words in d["likely_cause"], (d["likely_cause"], d["variants"][:3])


def test_a_layer_the_vlm_deleted_kept_is_unloaded(vlms):
    """LLaVA-OneVision's tower drops the original tower's last layer: a port that keeps it has weights for it
    from nowhere. The run fails on the parameters the checkpoint never filled."""
    _, folder = vlms["LLaVA-OneVision"]
    data = json.loads((folder / "config.json").read_text())
    vision = SiglipVisionConfig.from_dict(data)
    bigger = dataclasses.replace(vision, num_hidden_layers=vision.num_hidden_layers + 1)
    path = dataclasses.replace(feature_path(data, vision), layers=(bigger.num_hidden_layers,))
    shapes = {k[len("multi_modal_projector.") :]: tuple(v.shape) for k, v in projector_tensors(folder).items()}
    report = compare(
        weights=str(folder), image_features=True, candidate=lambda c: SiglipImageFeatures(bigger, path, shapes)
    )
    assert not report.passed
    assert any(k.startswith("vision_model.encoder.layers.3.") for k in report.unloaded_parameters), (
        report.unloaded_parameters
    )


# -- the CLI ---------------------------------------------------------------------------------------------------
@covers("P20")
def test_cli_image_features_passes_and_refuses_a_tower_in_one_line(vlms, tmp_path, capsys):
    _, folder = vlms["PaliGemma"]
    assert (
        parity_main(
            ["--weights", str(folder), "--image-features", "--depth", "coarse", "--json", str(tmp_path / "r.json")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "PASS" in out and "multi_modal_projector" in out, out
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["reference"]["image_features"].startswith("paligemma: last_hidden_state"), record["reference"]
    # A tower-only folder: one line, exit 2.
    assert parity_main(["--preset", "google/siglip-base-patch16-224", "--image-features"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no VLM preset" in err[0] and "--weights/--model" in err[0], err


# -- a port written as a user would (examples/llava_port.py): no rename map -----------------------------------
def _port_truth(model, kind, folder, tweak) -> float:
    """The truth without the harness: the port (weights put in by hand, by its own names) against the VLM's own
    get_image_features, both in float64. Returns the relative RMS difference."""
    from examples.llava_port import build

    port = tweak(build(json.loads((folder / "config.json").read_text()))).double()
    theirs = {k: v.double() for k, v in model.state_dict().items()}
    tower = "model.vision_tower." + (
        "" if any(k.startswith("model.vision_tower.embeddings.") for k in theirs) else "vision_model."
    )
    names = {
        "tower.patchify": "embeddings.patch_embedding",
        "tower.pos": "embeddings.position_embedding",
        "tower.final_norm": "post_layernorm",
    }
    mine = {}
    for key in port.state_dict():
        owner, _, leaf = key.rpartition(".")
        if owner in names:
            mine[key] = theirs[f"{tower}{names[owner]}.{leaf}"]
        elif owner.startswith("tower.blocks."):
            i, part = owner.split(".")[2], owner.split(".")[3]
            sub = {
                "norm1": "layer_norm1",
                "norm2": "layer_norm2",
                "wq": "self_attn.q_proj",
                "wk": "self_attn.k_proj",
                "wv": "self_attn.v_proj",
                "wo": "self_attn.out_proj",
                "fc1": "mlp.fc1",
                "fc2": "mlp.fc2",
            }[part]
            mine[key] = theirs[f"{tower}encoder.layers.{i}.{sub}.{leaf}"]
        else:
            proj = {"proj_in": "linear_1", "proj_out": "linear_2", "proj": "linear"}[owner]
            mine[key] = theirs[f"model.multi_modal_projector.{proj}.{leaf}"]
    port.load_state_dict(mine, strict=True)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    with torch.inference_mode():
        got = port(x)
    want = projector_output(model.double(), kind, x)
    model.float()
    if got.shape != want.shape:
        return math.inf
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()


def _late_layer(port):
    port.layer = port.layer + 1 if port.llava else port.layer
    return port


def _keep_first(port):
    port.drop_first = not port.drop_first
    return port


PORT_CASES = [
    ("PaliGemma", "honest", lambda p: p),
    ("LLaVA", "honest", lambda p: p),
    ("LLaVA-OneVision", "honest", lambda p: p),
    ("LLaVA", "feature layer one too late", _late_layer),
    ("LLaVA", "first token kept", _keep_first),
]


@pytest.mark.parametrize(("kind", "what", "tweak"), PORT_CASES, ids=[f"{k}-{w}" for k, w, _ in PORT_CASES])
def test_a_user_written_port_is_judged_as_the_float64_truth_says(kind, what, tweak, vlms, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent.parent))
    model, folder = vlms[kind]
    from examples.llava_port import build

    off = _port_truth(model, kind, folder, tweak)
    honest = off < 1e-9
    assert honest == (what == "honest"), (what, off)
    report = compare(weights=str(folder), image_features=True, candidate=lambda c: tweak(build(c)), depth="coarse")
    assert report.passed == honest, report.table()
    assert report.candidate.get("inferred_rename"), "a map was inferred (none was given)"
    if not honest:
        cause = (report.diagnosis or {}).get("likely_cause") or ""
        assert ("off by one" if "layer" in what else "first token kept") in cause, report.table()


# -- siglip-convert --with-projector -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["PaliGemma", "Gemma 3", "LLaVA-OneVision", "SmolVLM"])
def test_with_projector_folder_is_read_by_transformers_vlm_and_judged(kind, vlms, tmp_path, capsys, hf):
    from siglip_scratch.convert.cli import main as convert_main

    model, folder = vlms[kind]
    rc = convert_main([str(folder), str(tmp_path / "out"), "--with-projector", "--verify", "--quiet"])
    out = capsys.readouterr().out
    assert "verify: source check" in out and "PASS: every tensor equals its source" in out, out
    assert rc == 0 and "verify: image features of the output against transformers." in out, out
    # transformers' own VLM class reads it: nothing missing but the language model, the same image features.
    verbosity = hf.utils.logging.get_verbosity()
    hf.utils.logging.set_verbosity_error()
    try:
        loaded, info = type(model).from_pretrained(tmp_path / "out", output_loading_info=True)
    finally:
        hf.utils.logging.set_verbosity(verbosity)
    lm = ("language_model", "text_model", "lm_head")
    assert not [k for k in info["missing_keys"] if not any(p in k for p in lm)], info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    want, got = projector_output(model, kind, x), projector_output(loaded.eval(), kind, x)
    assert_exact(got, want, f"{kind}: features of the --with-projector folder")
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert record["options"]["with_projector"] is True
    # The default stays vision-only: no projector, a tower config.
    assert convert_main([str(folder), str(tmp_path / "tower"), "--quiet"]) == 0
    keys = json.loads((tmp_path / "tower" / "conversion.json").read_text())["tensors"]
    assert keys < record["tensors"]
    assert "vision_config" not in json.loads((tmp_path / "tower" / "config.json").read_text())


@covers("C14")
def test_with_projector_refuses_a_tower_in_one_line(tmp_path, capsys):
    from siglip_scratch import SiglipVisionModel
    from siglip_scratch.config import TINY_CONFIG
    from siglip_scratch.convert.cli import main as convert_main

    SiglipVisionModel.from_config(TINY_CONFIG).save_pretrained(tmp_path / "tower")
    assert convert_main([str(tmp_path / "tower"), str(tmp_path / "out"), "--with-projector"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--with-projector needs a VLM checkpoint" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.hub
def test_with_projector_from_the_hub_fetches_tower_and_projector_bytes_only(vlms, tmp_path):
    """A VLM sharded so that tower, projector and language model share shards, served by a hub on 127.0.0.1:
    exactly the headers and the tower's and projector's byte ranges are fetched, never a language-model byte."""
    from siglip_scratch.checkpoint import read_safetensors_header

    from .hubserver import FakeHub
    from .test_convert import run_cli

    model, _ = vlms["LLaVA"]
    src = tmp_path / "sharded"
    model.save_pretrained(src, max_shard_size="40KB")
    hub = FakeHub().start()
    try:
        repo = "someone/tiny-llava"
        hub.add_repo(repo, {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()})
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0"}
        proc = run_cli(repo, str(tmp_path / "out"), "--with-projector", "--quiet", env=env)
        assert proc.returncode == 0, proc.stderr
        for shard in sorted(src.glob("*.safetensors")):
            tensors, _ = read_safetensors_header(shard)
            wanted = [t for k, t in tensors.items() if "vision_tower" in k or "multi_modal_projector" in k]
            header = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
            expected = header + sum(t.end - t.start for t in wanted) if wanted else 0
            assert hub.bytes_served(repo, shard.name) == expected, (
                shard.name,
                hub.bytes_served(repo, shard.name),
                expected,
            )
    finally:
        hub.stop()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert any(k.startswith("multi_modal_projector.") for k in f.keys())


@covers("P20", "P21")
def test_image_features_refusals_are_one_line(vlms, tmp_path):
    from safetensors.torch import load_file, save_file

    from siglip_scratch.errors import ConfigError, InputError
    from siglip_scratch.parity.candidates import open_candidate

    _, folder = vlms["LLaVA"]
    # A VLM folder without its projector (a vision-only conversion under the VLM's config.json).
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "multi_modal_projector" not in k}, str(bare / "model.safetensors"))
    with pytest.raises(InputError, match="no projector tensors"):
        compare(weights=str(bare), image_features=True)
    # A VLM family we do not know.
    with pytest.raises(ConfigError, match="not a VLM with a SigLIP tower whose image features we know"):
        feature_path({"model_type": "blip_2"}, SiglipVisionConfig())

    # A candidate that is not PyTorch (an ONNX graph, activation files): refused before any weight is read.
    class NotTorch(type(open_candidate(None))):
        kind = "onnx"
        image_features = False

    with pytest.raises(InputError, match="judges PyTorch candidates"):
        compare(weights=str(folder), image_features=True, candidate=NotTorch())


def test_inspect_shows_the_feature_sites_and_its_map_judges_the_same(vlms, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent.parent))
    _, folder = vlms["LLaVA"]
    spec = "examples/llava_port.py:build"
    saved = tmp_path / "map.json"
    args = ["inspect", "--candidate", spec, "--weights", str(folder), "--image-features", "--write-rename", str(saved)]
    assert parity_main(args) == 0
    out = capsys.readouterr().out
    import re

    assert re.search(r"^vision_feature +input of proj_in ", out, re.M), out
    assert re.search(r"^multi_modal_projector +the candidate's output \(its projector: proj_in\)", out, re.M), out
    from examples.llava_port import build

    report = compare(weights=str(folder), image_features=True, candidate=build, rename=str(saved), depth="coarse")
    assert report.passed, report.table()


class Flattened(SiglipImageFeatures):
    """Honest features returned as ports return them: flattened [B·T, D] as spliced into the language model's
    sequence, or one [T, D] tensor per image (transformers 5's own tuple)."""

    layout = "flat"

    def forward(self, pixel_values):
        features = super().forward(pixel_values)
        return features.flatten(0, 1) if self.layout == "flat" else {"image_features": tuple(features.unbind(0))}


@pytest.mark.parametrize("layout", ["flat", "per-image"])
def test_features_returned_flattened_or_per_image_are_read_as_tokens(layout, vlms, hf):
    _, folder = vlms["LLaVA"]
    data = json.loads((folder / "config.json").read_text())
    vision = SiglipVisionConfig.from_dict(data)
    shapes = {k[len("multi_modal_projector.") :]: tuple(v.shape) for k, v in projector_tensors(folder).items()}

    def build(config):
        model = Flattened(vision, feature_path(data, vision), shapes)
        model.layout = layout
        return model

    report = compare(weights=str(folder), image_features=True, candidate=build, depth="coarse", batch=3)
    assert report.passed, report.table()
    assert report.batches["checked"] and report.batches["passed"], report.batches


def _functional(port):
    """The projector written with functional calls on its parameters: no module is ever fed the vision feature."""

    def forward(pixels):
        states = port.tower(pixels)
        feature = states[port.layer][:, 1:] if port.drop_first else states[port.layer]
        hidden = F.gelu(F.linear(feature, port.proj_in.weight, port.proj_in.bias))
        return F.linear(hidden, port.proj_out.weight, port.proj_out.bias)

    port.forward = forward
    return port


@pytest.mark.parametrize("bug", [False, True], ids=["honest", "layer one too late"])
def test_a_functional_projector_is_judged_end_to_end(bug, vlms, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent.parent))
    model, folder = vlms["LLaVA"]
    from examples.llava_port import build

    def tweak(port):
        return _functional(_late_layer(port) if bug else port)

    off = _port_truth(model, "LLaVA", folder, tweak)
    assert (off < 1e-9) == (not bug), off
    report = compare(weights=str(folder), image_features=True, candidate=lambda c: tweak(build(c)), depth="coarse")
    assert report.passed == (not bug), report.table()
    statuses = {s.name: s.status for s in report.sites}
    assert statuses["vision_feature"] == "not_exposed", statuses
    assert report.propagated_sites is not None
    prop = {s.name: s.status for s in report.propagated_sites}
    assert (prop["multi_modal_projector"] == "fail") == bug, prop


@pytest.mark.parametrize(
    "cls",
    [
        "PaliGemmaConfig",
        "Gemma3Config",
        "LlavaConfig",
        "LlavaNextConfig",
        "LlavaOnevisionConfig",
        "Idefics3Config",
        "SmolVLMConfig",
    ],
)
def test_feature_path_reads_what_transformers_config_holds(cls, tmp_path, hf):
    """save_pretrained leaves class defaults out of config.json: our defaults must be transformers' own."""
    siglip = (
        {"vision_config": {"model_type": "siglip_vision_model"}} if cls in ("LlavaConfig", "LlavaNextConfig") else {}
    )
    config = getattr(hf, cls)(**siglip)  # LLaVA's default tower is CLIP's
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    vision = SiglipVisionConfig.from_dict(data)
    path = feature_path(data, vision)
    if path.family == "llava":
        layer, n = config.vision_feature_layer, vision.num_hidden_layers
        chosen = [layer] if isinstance(layer, int) else list(layer)
        assert path.layers == tuple(i if i >= 0 else n + 1 + i for i in chosen), (path, layer)
        assert path.strategy == config.vision_feature_select_strategy
        assert path.extra["projector_hidden_act"] == config.projector_hidden_act
        assert path.extra["multimodal_projector_bias"] == config.multimodal_projector_bias
    else:
        assert path.layers == (vision.num_hidden_layers,) and path.post_layernorm
    if path.family == "gemma3":
        assert path.extra["mm_tokens_per_image"] == config.mm_tokens_per_image
    if path.family == "idefics3":
        assert path.extra["scale_factor"] == config.scale_factor
    assert path.text_hidden_size == config.text_config.hidden_size


@pytest.mark.hub
def test_image_features_of_a_hub_vlm_fetch_its_projector_shard_never_its_language_model(vlms, tmp_path):
    """--model VLM_ID: the tower's shards and the projector's, from a hub on 127.0.0.1; no language-model shard.
    The shards hold transformers' own saved tensors, split by part (tower, projector, language model)."""
    from safetensors.torch import load_file, save

    from .hubserver import FakeHub

    _, folder = vlms["LLaVA"]
    state = load_file(str(folder / "model.safetensors"))
    parts = {"vision_tower": {}, "multi_modal_projector": {}, "language_model": {}}
    for key, tensor in state.items():
        part = next(p for p in parts if p in key.split(".")[:2])
        parts[part][key] = tensor
    names = {p: f"model-0000{i + 1}-of-00003.safetensors" for i, p in enumerate(parts)}
    files = {names[p]: save(t, metadata={"format": "pt"}) for p, t in parts.items()}
    weight_map = {k: names[p] for p, t in parts.items() for k in t}
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["config.json"] = (folder / "config.json").read_bytes()
    hub = FakeHub().start()
    try:
        repo = "someone/tiny-llava-sharded"
        hub.add_repo(repo, files)
        env = {
            **__import__("os").environ,
            "HF_ENDPOINT": hub.url,
            "HF_HUB_CACHE": str(tmp_path / "cache"),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
        }
        import subprocess
        import sys

        cmd = [
            sys.executable,
            "-m",
            "siglip_scratch.parity.cli",
            "--model",
            repo,
            "--image-features",
            "--depth",
            "coarse",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "PASS" in proc.stdout and "multi_modal_projector" in proc.stdout, proc.stdout
        assert hub.bytes_served(repo, names["multi_modal_projector"]) > 0
        assert hub.bytes_served(repo, names["language_model"]) == 0, "a language-model shard was fetched"
    finally:
        hub.stop()
