"""The towers people actually have: VLMs saved by transformers itself (never a hand-made layout).

Each VLM is built with transformers' own classes at a tiny, structure-true config and written with
``save_pretrained`` (one file, and sharded so that vision and language tensors share shards). The
converted folder, and ``SiglipVisionModel.from_pretrained`` on the VLM folder itself, must reproduce
the VLM's own vision tower bit for bit in float32. Run under transformers 5.x (``make test``) and
4.57.6 (``make test-457``), which write different on-disk layouts.
"""

from __future__ import annotations

import json

import pytest
import torch

from siglip_scratch import SiglipVisionConfig, SiglipVisionModel
from siglip_scratch.convert.cli import main as convert_main

from .conftest import assert_exact, require_transformers

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, head_dim=8
)


def _build(kind: str, T):
    vision = {**VISION, "model_type": "siglip_vision_model"}
    if kind == "PaliGemma":
        cfg = T.PaliGemmaConfig(vision_config=vision, text_config={**TEXT, "model_type": "gemma", "vocab_size": 300})
        return T.PaliGemmaForConditionalGeneration(cfg)
    if kind == "PaliGemma 2":  # the same class with a Gemma 2 language model
        text = {**TEXT, "model_type": "gemma2", "vocab_size": 300}
        return T.PaliGemmaForConditionalGeneration(T.PaliGemmaConfig(vision_config=vision, text_config=text))
    if kind == "Gemma 3":  # no MAP head, as the real 896-px tower
        cfg = T.Gemma3Config(
            vision_config={**vision, "vision_use_head": False},
            text_config={**TEXT, "model_type": "gemma3_text", "vocab_size": 300},
            mm_tokens_per_image=4,
        )
        return T.Gemma3ForConditionalGeneration(cfg)
    if kind == "LLaVA":
        cfg = T.LlavaConfig(vision_config=vision, text_config={**TEXT, "model_type": "llama", "vocab_size": 300})
        return T.LlavaForConditionalGeneration(cfg)
    if kind == "LLaVA-NeXT":
        cfg = T.LlavaNextConfig(
            vision_config=vision,
            text_config={**TEXT, "model_type": "llama", "vocab_size": 300},
            image_grid_pinpoints=[[32, 32], [32, 64]],
        )
        return T.LlavaNextForConditionalGeneration(cfg)
    if kind == "LLaVA-OneVision":
        cfg = T.LlavaOnevisionConfig(
            vision_config=vision, text_config={**TEXT, "model_type": "qwen2", "vocab_size": 300}
        )
        return T.LlavaOnevisionForConditionalGeneration(cfg)
    raise AssertionError(kind)


KINDS = ["PaliGemma", "PaliGemma 2", "Gemma 3", "LLaVA", "LLaVA-NeXT", "LLaVA-OneVision"]


def _tower(model):
    return next(m for n, m in model.named_modules() if n.split(".")[-1] == "vision_tower")


def _reference_outputs(model, x):
    torch.manual_seed(0)
    tower = _tower(model).eval()
    with torch.inference_mode():
        out = tower(pixel_values=x)
    return out.last_hidden_state, getattr(out, "pooler_output", None)


def _assert_same_tower(ours: SiglipVisionModel, want, x, what: str) -> None:
    with torch.inference_mode():
        got = ours(x)
    assert_exact(got.last_hidden_state, want[0], f"{what}: last_hidden_state")
    if ours.config.vision_use_head:
        assert_exact(got.pooler_output, want[1], f"{what}: pooler_output")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (model, single-file folder, sharded folder)."""
    hf = require_transformers()  # module scope cannot take the function-scoped `hf` fixture
    out = {}
    for kind in KINDS:
        torch.manual_seed(1)
        model = _build(kind, hf).eval()
        root = tmp_path_factory.mktemp(kind.replace(" ", "_"))
        model.save_pretrained(root / "single")
        model.save_pretrained(root / "sharded", max_shard_size="40KB")
        out[kind] = (model, root / "single", root / "sharded")
    return out


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("kind", KINDS)
def test_vlm_saved_by_transformers_converts_and_matches_its_tower(kind, sharded, saved, tmp_path, capsys, hf):
    model, single, shards = saved[kind]
    src = shards if sharded else single
    if sharded:
        index = json.loads((src / "model.safetensors.index.json").read_text())
        files = {
            f: sorted({k.split(".")[0] for k, v in index["weight_map"].items() if v == f})
            for f in set(index["weight_map"].values())
        }
        assert len(files) > 1 and any(len(prefixes) > 1 for prefixes in files.values()), files
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    want = _reference_outputs(model, x)

    assert convert_main([str(src), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    layout = next(line for line in out.splitlines() if line.startswith("layout: "))
    assert layout.startswith(f"layout: {kind}: VLM tower"), layout
    converted = SiglipVisionModel.from_pretrained(tmp_path / "out")
    assert converted.config.vision_use_head == (kind != "Gemma 3")
    _assert_same_tower(converted, want, x, f"{kind} converted")
    # The VLM folder loads directly too; only its vision tensors are read.
    _assert_same_tower(SiglipVisionModel.from_pretrained(src), want, x, f"{kind} from_pretrained")
    # And transformers' own SiglipVisionModel loads the converted folder with nothing missing.
    _, info = hf.SiglipVisionModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


@pytest.mark.parametrize("kind", KINDS)
def test_vlm_in_memory_state_dict(kind, saved, hf):
    model = saved[kind][0]
    cfg = SiglipVisionConfig.from_dict(model.config.vision_config.to_dict())
    ours = SiglipVisionModel.from_state_dict(cfg, model.state_dict())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    _assert_same_tower(ours, _reference_outputs(model, x), x, f"{kind} state_dict()")


def test_paligemma_config_without_vision_use_head_reads_as_transformers_does(hf):
    data = {"model_type": "paligemma", "vision_config": {k: v for k, v in VISION.items()}}
    ours = SiglipVisionConfig.from_dict(data)
    theirs = hf.PaliGemmaConfig(vision_config={**VISION, "model_type": "siglip_vision_model"}).vision_config
    assert ours.vision_use_head == getattr(theirs, "vision_use_head", True) is True


def _idefics_like(kind: str, T):
    vision = dict(VISION)
    text = {**TEXT, "model_type": "llama", "vocab_size": 300}
    if kind == "Idefics3":
        return T.Idefics3ForConditionalGeneration(
            T.Idefics3Config(vision_config=vision, text_config=text, scale_factor=2)
        )
    return T.SmolVLMForConditionalGeneration(T.SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=2))


@pytest.mark.parametrize("kind", ["Idefics3", "SmolVLM"])
def test_smolvlm_idefics3_tower_equals_siglip_on_full_size_images(kind, tmp_path, capsys, hf):
    torch.manual_seed(2)
    model = _idefics_like(kind, hf).eval()
    model.save_pretrained(tmp_path / "src")
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"layout: {kind}: SmolVLM/Idefics3 tower" in out and "bucketed position ids" in out, out
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert any("bucketed position ids" in n for n in record["notes"])
    ours = SiglipVisionModel.from_pretrained(tmp_path / "out")
    assert ours.config.vision_use_head is False
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # full-size images: every patch real
    tower = next(m for n, m in model.named_modules() if n.split(".")[-1] == "vision_model")
    with torch.inference_mode():
        want = tower(pixel_values=x).last_hidden_state
        if int(hf.__version__.split(".")[0]) >= 5:
            # transformers 5: positions 0…N−1, exactly SigLIP without a head.
            assert_exact(ours(x).last_hidden_state, want, f"{kind} tower vs converted")
        else:
            # transformers 4.57 buckets i/n·(1 − 1e-6) with right=True: i/n lands just below its
            # boundary, so each axis reads positions [0, 0, 1, …, n−2]. That, and nothing else, differs.
            assert not torch.equal(ours(x).last_hidden_state, want)
            n = ours.config.grid_size
            boundaries = torch.arange(1 / n, 1.0, 1 / n)
            axis = torch.bucketize(torch.arange(n, dtype=torch.float32) / n * (1 - 1e-6), boundaries, right=True)
            ids = (axis[:, None] * n + axis[None, :]).flatten()
            assert ids.tolist() != list(range(n * n))
            table = ours.vision_model.embeddings.position_embedding
            table.weight = torch.nn.Parameter(table.weight[ids].clone())
            assert_exact(ours(x).last_hidden_state, want, f"{kind} tower (4.57 position ids) vs converted")


@pytest.mark.parametrize("model_type", ["siglip2", "siglip2_vision_model"])
def test_siglip2_naflex_is_refused_by_name(model_type, tmp_path):
    from siglip_scratch import ConfigError

    with pytest.raises(ConfigError, match="SigLIP 2 NaFlex"):
        SiglipVisionConfig.from_dict({"model_type": model_type, **VISION})


@pytest.mark.hub
def test_hub_paligemma_reads_only_the_vision_bytes(tmp_path, hf):
    """A PaliGemma saved by transformers, sharded so vision and language share shards, served by the test
    hub: the default ranged read fetches <= 1.05x the vision tensors' bytes (headers included), the
    whole-shard path (--full-download) what the shards weigh; both outputs equal the VLM's tower."""
    import os

    from siglip_scratch.checkpoint import map_vision_keys, read_safetensors_header

    from .hubserver import FakeHub
    from .test_convert import run_cli

    torch.manual_seed(3)
    vision = {
        **VISION,
        "hidden_size": 128,
        "intermediate_size": 256,
        "image_size": 64,
        "model_type": "siglip_vision_model",
    }
    text = {**TEXT, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "head_dim": 32}
    model = hf.PaliGemmaForConditionalGeneration(
        hf.PaliGemmaConfig(vision_config=vision, text_config={**text, "model_type": "gemma", "vocab_size": 4000})
    ).eval()
    # The shard size that makes a shard hold vision tensors and several language tensors differs
    # between transformers versions (they order and pack tensors differently): take the first that does.
    for size in ("2500KB", "1500KB", "3MB", "1MB"):
        src = tmp_path / f"src-{size}"
        model.save_pretrained(src, max_shard_size=size)
        shards = sorted(p.name for p in src.glob("*.safetensors"))
        vision_bytes, mixed = 0, False
        for name in shards:
            tensors, _ = read_safetensors_header(src / name)
            kept, dropped, _ = map_vision_keys(tensors)
            vision_bytes += sum(tensors[k].nbytes for k in kept.values())
            mixed |= len(kept) > 0 and len(dropped) >= 5
        if mixed:
            break
    assert mixed, "no shard size put vision and language tensors in one shard"
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}

    hub = FakeHub().start()
    try:
        hub.add_repo("acme/paligemma-tiny", files)
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0"}
        env["TMPDIR"] = str(tmp_path / "tmp")
        os.mkdir(tmp_path / "tmp")

        def served() -> int:
            return sum(hub.bytes_served("acme/paligemma-tiny", n) for n in shards)

        proc = run_cli("acme/paligemma-tiny", str(tmp_path / "ranged"), env=env)
        assert proc.returncode == 0, proc.stderr
        ranged = served()
        proc = run_cli("acme/paligemma-tiny", str(tmp_path / "full"), "--full-download", env=env)
        assert proc.returncode == 0, proc.stderr
        whole = served() - ranged
    finally:
        hub.stop()
    print(f"{size} shards: vision tensors {vision_bytes} B; ranged read {ranged} B; whole vision shards {whole} B")
    assert ranged <= 1.05 * vision_bytes, f"ranged read fetched {ranged} B for {vision_bytes} B of vision tensors"
    assert whole > ranged, (whole, ranged)
    assert not list((tmp_path / "tmp").iterdir()), "scratch files left behind"
    record = json.loads((tmp_path / "ranged" / "conversion.json").read_text())
    reads = [e for e in record["inputs"] if "bytes_fetched" in e]
    assert reads and sum(e["bytes_fetched"] for e in reads) == ranged
    assert all(e["sha256_checked"] is False and e["not_checked"] for e in reads)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    want = _reference_outputs(model, x)
    for out in ("ranged", "full"):
        _assert_same_tower(SiglipVisionModel.from_pretrained(tmp_path / out), want, x, f"PaliGemma via hub ({out})")


@pytest.mark.parametrize(
    ("vocab", "resample", "why"), [(256000, 2, "SigLIP 2 by its config.json"), (32000, 3, "SigLIP by its config.json")]
)
def test_siglip2_fixed_resolution_is_told_by_its_config_not_its_path(tmp_path, vocab, resample, why):
    """SigLIP 2 fixed-resolution checkpoints are transformers SiglipModels whose text tower uses Gemma's
    256000-token vocabulary; they resize bilinear. Saved by transformers without a preprocessor config, in
    a folder whose name says "siglip2" either way: the converter goes by the config."""
    T = require_transformers()
    torch.manual_seed(0)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=vocab)
    model = T.SiglipModel(T.SiglipConfig(vision_config=VISION, text_config=text)).eval()
    src = tmp_path / "siglip2-base-patch16-224-copy"
    model.save_pretrained(src)
    assert convert_main([str(src), str(tmp_path / "out")]) == 0
    pre = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert pre["resample"] == resample, pre
    assert why in json.dumps(record), record
    ours = SiglipVisionModel.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(2, 3, VISION["image_size"], VISION["image_size"])
    with torch.inference_mode():
        assert_exact(ours(x).last_hidden_state, model.vision_model(x).last_hidden_state, "SigLIP 2 fixed-res tower")


def test_siglip2_presets_resize_bilinear_and_siglip_bicubic():
    from siglip_scratch import SiglipImageProcessor
    from siglip_scratch.config import SIGLIP2_PRESETS, get_preset, siglip_generation

    assert len(SIGLIP2_PRESETS) == 14
    giant = get_preset("google/siglip2-giant-opt-patch16-384")
    assert (giant.hidden_size, giant.intermediate_size, giant.num_hidden_layers, giant.image_size) == (
        1536,
        6144,
        40,
        384,
    )
    assert SiglipImageProcessor.for_preset("google/siglip2-so400m-patch14-384").resample == 2
    assert SiglipImageProcessor.for_preset("google/siglip-so400m-patch14-384").resample == 3
    assert siglip_generation({"_name_or_path": "google/siglip2-base-patch16-224"}) == "siglip2"
    assert (
        siglip_generation({"model_type": "siglip_vision_model", **VISION}) is None
    )  # a vision-only config cannot tell
    assert siglip_generation({"model_type": "siglip2"}) == "siglip2-naflex"
