"""siglip-convert: every source layout, bit-identical float32 relayout, the hub paths, the output folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from siglip_scratch import ConfigError, SiglipVisionConfig, SiglipVisionModel, get_preset
from siglip_scratch.convert import convert
from siglip_scratch.convert.cli import main as convert_main
from siglip_scratch.modeling import synthetic_state_dict
from siglip_scratch.parity.reference import build_reference

from . import layouts
from .catalogue import covers
from .conftest import TINY, TINY_ODD, assert_exact, pixels
from .hubserver import FakeHub

V = "vision_model."


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            assert fh.metadata()["format"] == "pt"
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want), f"keys differ: {sorted(set(got) ^ set(want))[:6]}"
    for k in want:
        assert got[k].dtype == want[k].dtype, f"{k}: {got[k].dtype} vs {want[k].dtype}"
        assert torch.equal(got[k], want[k]), f"{k}: not bit-identical, max |Δ| {(got[k] - want[k]).abs().max()}"


def check_loads_everywhere(folder: Path, state: dict[str, torch.Tensor], cfg: SiglipVisionConfig, hf) -> None:
    """Our strict loader and transformers both load the folder and agree with the source weights."""
    ours = SiglipVisionModel.from_pretrained(folder)
    theirs, info = hf.SiglipVisionModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref = build_reference(cfg, state)
    x = pixels(cfg, 2)
    with torch.inference_mode():
        want = ref(x).last_hidden_state
        assert_exact(ours(x).last_hidden_state, want, "ours on the converted folder")
        assert_exact(theirs.eval()(x).last_hidden_state, want, "transformers on the converted folder")


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return synthetic_state_dict(TINY, seed=4)


def _hf_folder(tmp_path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# -- HF layouts ----------------------------------------------------------------------------------------
def test_full_siglip_model_folder_is_a_pure_relayout(tmp_path, state, hf):
    src = _hf_folder(
        tmp_path,
        {**state, **layouts.text_tower()},
        {"model_type": "siglip", "vision_config": TINY.to_dict(), "text_config": {}},
    )
    out = tmp_path / "out"
    result = convert(str(src), out)
    assert_same_tensors(read_folder(out), state)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "conversion.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert SiglipVisionConfig.from_pretrained(out) == TINY
    assert result.plan.dropped == 5
    check_loads_everywhere(out, state, TINY, hf)


@pytest.mark.parametrize("layout", ["flat", "paligemma-hub", "paligemma-5x", "paligemma-5x-flat"])
def test_vision_model_and_paligemma_layouts_sharded(tmp_path, layout, hf):
    cfg = TINY.replace(vision_use_head=False)
    state = synthetic_state_dict(cfg, seed=2)
    prefix = {
        "flat": "",
        "paligemma-hub": "vision_tower.vision_model.",
        "paligemma-5x": "model.vision_tower.vision_model.",
        "paligemma-5x-flat": "model.vision_tower.",
    }[layout]
    vision = {prefix + k[len(V) :]: v for k, v in state.items()}
    keys = sorted(vision)
    shards = {
        "model-00001-of-00003.safetensors": {k: vision[k] for k in keys[: len(keys) // 2]},
        "model-00002-of-00003.safetensors": {k: vision[k] for k in keys[len(keys) // 2 :]},
    }
    lm = "language_model." if layout == "paligemma-hub" else "model.language_model."
    if layout != "flat":
        shards["model-00002-of-00003.safetensors"]["multi_modal_projector.linear.weight"] = torch.ones(4, 4)
        shards["model-00003-of-00003.safetensors"] = {lm + "embed_tokens.weight": torch.ones(8, 4)}
    layouts.save_sharded(tmp_path / "src", shards)
    config = (
        # vision_use_head stated, as real PaliGemma configs do (absent, transformers reads a head)
        {"model_type": "paligemma", "vision_config": cfg.to_dict()} if layout != "flat" else cfg.to_dict()
    )
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    if layout != "flat":  # the language-model shard is never needed: delete it to prove it
        (tmp_path / "src" / "model-00003-of-00003.safetensors").unlink()
    convert(str(tmp_path / "src"), tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"), state)
    assert SiglipVisionConfig.from_pretrained(tmp_path / "out").vision_use_head is False
    check_loads_everywhere(tmp_path / "out", state, cfg, hf)


def test_single_safetensors_file_with_config_beside(tmp_path, state):
    src = _hf_folder(tmp_path, state, TINY.to_dict())
    convert(str(src / "model.safetensors"), tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"), state)


def test_pickle_bin_is_read_with_weights_only(tmp_path, state):
    src = tmp_path / "src"
    src.mkdir()
    torch.save({**state, **layouts.text_tower()}, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": TINY.to_dict()}))
    convert(str(src), tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"), state)


# -- dtype, head, shards, provenance -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_casts_floating_tensors(tmp_path, state, dtype):
    src = _hf_folder(tmp_path, state, TINY.to_dict())
    convert(str(src), tmp_path / "out", dtype=dtype)
    want = {k: v.to(getattr(torch, dtype)) for k, v in state.items()}
    assert_same_tensors(read_folder(tmp_path / "out"), want)


def test_no_head(tmp_path, state, hf):
    src = _hf_folder(tmp_path, state, TINY.to_dict())
    convert(str(src), tmp_path / "out", no_head=True)
    want = {k: v for k, v in state.items() if not k.startswith(V + "head.")}
    assert_same_tensors(read_folder(tmp_path / "out"), want)
    cfg = SiglipVisionConfig.from_pretrained(tmp_path / "out")
    assert cfg.vision_use_head is False
    check_loads_everywhere(tmp_path / "out", want, cfg, hf)


def test_sharded_output_and_index(tmp_path, state, hf):
    src = _hf_folder(tmp_path, state, TINY.to_dict())
    convert(str(src), tmp_path / "out", max_shard_size="40KB")
    names = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert len(names) > 1 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(state) and set(index["weight_map"].values()) == set(names)
    assert_same_tensors(read_folder(tmp_path / "out"), state)
    check_loads_everywhere(tmp_path / "out", state, TINY, hf)


def test_conversion_json_records_hashes(tmp_path, state):
    import hashlib

    src = _hf_folder(tmp_path, state, TINY.to_dict())
    convert(str(src), tmp_path / "out")
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert record["tool"] == "siglip-convert" and record["source"]["kind"] == "hf-folder"
    for entry in record["inputs"]:
        assert entry["sha256"] == hashlib.sha256(Path(entry["file"]).read_bytes()).hexdigest()
    for entry in record["outputs"]:
        assert entry["sha256"] == hashlib.sha256((tmp_path / "out" / entry["file"]).read_bytes()).hexdigest()
    assert {e["file"] for e in record["outputs"]} == {"model.safetensors", "config.json", "preprocessor_config.json"}


def test_preprocessor_config_copied_or_generated(tmp_path, state):
    src = _hf_folder(tmp_path, state, TINY.to_dict())
    convert(str(src), tmp_path / "gen")
    gen = json.loads((tmp_path / "gen" / "preprocessor_config.json").read_text())
    assert gen["resample"] == 3 and gen["size"] == {"height": 32, "width": 32}
    custom = {**gen, "resample": 2, "image_processor_type": "SiglipImageProcessor"}
    (src / "preprocessor_config.json").write_text(json.dumps(custom))
    convert(str(src), tmp_path / "copied")
    assert json.loads((tmp_path / "copied" / "preprocessor_config.json").read_text()) == custom


# -- big_vision .npz ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "root, scanned, paligemma",
    [("img/", False, False), ("params/img/", False, False), ("img/", True, False), ("params/img/", True, True)],
    ids=["two-tower", "params-prefix", "scanned", "paligemma-scanned"],
)
def test_big_vision_npz_layouts(tmp_path, root, scanned, paligemma, hf):
    cfg = TINY_ODD.replace(vision_use_head=not paligemma)
    state = synthetic_state_dict(cfg, seed=6)
    if paligemma:
        extra = {
            root + "head/kernel": np.ones((cfg.hidden_size, 8), np.float32),  # the projector: not the tower
            "params/llm/embedder/input_embedding": np.ones((10, 8), np.float32),
        }
    else:
        extra = {"txt/Encoder_0/encoder_norm/scale": np.ones(4, np.float32), "t": np.ones(1), "b": np.ones(1)}
    np.savez(tmp_path / "ckpt.npz", **layouts.to_big_vision(state, cfg, root=root, scanned=scanned, extra=extra))
    result = convert(str(tmp_path / "ckpt.npz"), tmp_path / "out")
    assert SiglipVisionConfig.from_pretrained(tmp_path / "out") == cfg  # inferred from shapes
    assert_same_tensors(read_folder(tmp_path / "out"), state)
    assert ("PaliGemma" in result.plan.layout) == paligemma
    check_loads_everywhere(tmp_path / "out", state, cfg, hf)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_big_vision_half_precision_npz(tmp_path, dtype):
    state = synthetic_state_dict(TINY, seed=6)
    np.savez(tmp_path / "ckpt.npz", **layouts.to_big_vision(state, TINY, dtype=dtype))
    convert(str(tmp_path / "ckpt.npz"), tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"), {k: v.to(getattr(torch, dtype)) for k, v in state.items()})


def test_big_vision_config_override(tmp_path):
    state = synthetic_state_dict(TINY, seed=6)
    np.savez(tmp_path / "ckpt.npz", **layouts.to_big_vision(state, TINY))
    TINY.replace(hidden_act="gelu").save_pretrained(tmp_path)
    convert(str(tmp_path / "ckpt.npz"), tmp_path / "out", config=str(tmp_path / "config.json"))
    assert SiglipVisionConfig.from_pretrained(tmp_path / "out").hidden_act == "gelu"


def test_tensor_data_is_64_byte_aligned_whatever_the_source_path(tmp_path):
    """The header names the source path, so its length varies; the data section must not move with it. Loaded
    zero-copy, a misaligned weight takes another MKL matrix-vector path (the batch-1 head) and the converted model
    differed from the same weights in memory by an ulp, depending on the path (first seen under pytest-xdist)."""
    cfg = get_preset("google/siglip-base-patch16-224").replace(num_hidden_layers=1)
    state = synthetic_state_dict(cfg, seed=8)
    ours = SiglipVisionModel.from_state_dict(cfg, state)
    x = pixels(cfg, 1)
    with torch.inference_mode():
        want = ours(x).pooler_output
    for n in range(8):  # eight path lengths: every residue of the header's 8-byte padding
        src = tmp_path / ("s" * (n + 1))
        src.mkdir()
        save_file(state, str(src / "model.safetensors"))
        (src / "config.json").write_text(json.dumps(cfg.to_dict()))
        out = tmp_path / f"out{n}"
        assert convert_main([str(src), str(out), "--quiet"]) == 0
        raw = (out / "model.safetensors").read_bytes()
        start = 8 + int.from_bytes(raw[:8], "little")
        assert start % 64 == 0, f"{src}: tensor data starts at byte {start}, not on a 64-byte boundary"
        converted = SiglipVisionModel.from_pretrained(out)
        assert {p.data_ptr() % 64 for p in converted.parameters()} == {0}
        with torch.inference_mode():
            assert_exact(converted(x).pooler_output, want, f"converted from {src.name}")


# -- timm / open_clip ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "visual.trunk."], ids=["timm", "open_clip"])
def test_timm_and_open_clip_layouts(tmp_path, prefix, capsys):
    cfg = get_preset("google/siglip-base-patch16-224").replace(num_hidden_layers=2)  # width 768 -> 12 heads
    state = synthetic_state_dict(cfg, seed=8)
    sd = layouts.to_timm(state, cfg, prefix=prefix)
    if prefix:
        sd.update({"text.token_embedding.weight": torch.ones(4, 4), "logit_scale": torch.ones(1)})
    torch.save(sd, tmp_path / "model.pt")
    rc = convert_main([str(tmp_path / "model.pt"), str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    layout = next(line for line in out.splitlines() if line.startswith("layout: "))
    assert "gelu_pytorch_tanh" in out and ("open_clip" in layout) == bool(prefix), out
    assert SiglipVisionConfig.from_pretrained(tmp_path / "out") == cfg
    assert_same_tensors(read_folder(tmp_path / "out"), state)
    ours, converted = SiglipVisionModel.from_state_dict(cfg, state), SiglipVisionModel.from_pretrained(tmp_path / "out")
    x = pixels(cfg, 1)
    with torch.inference_mode():
        assert_exact(converted(x).pooler_output, ours(x).pooler_output, "timm -> ours")


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_open_clip_training_checkpoint_is_unwrapped(tmp_path, wrapper, capsys):
    """open_clip's training loop saves {"epoch", "name", "state_dict": DDP-prefixed weights, "optimizer"}.
    Built here as its train code writes it; `make compat` (test_compat.py) does it with open_clip itself."""
    cfg = get_preset("google/siglip-base-patch16-224").replace(num_hidden_layers=2)
    state = synthetic_state_dict(cfg, seed=8)
    weights = {"module." + k: v for k, v in layouts.to_timm(state, cfg, prefix="visual.trunk.").items()}
    weights["module.logit_scale"] = torch.ones(1)
    ckpt = {"epoch": 7, "name": "siglip-run", wrapper: weights, "optimizer": {"state": {}, "param_groups": []}}
    torch.save(ckpt, tmp_path / "epoch_7.pt")
    assert convert_main([str(tmp_path / "epoch_7.pt"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"training checkpoint: weights taken from '{wrapper}' (ignored: epoch, name, optimizer)" in out, out
    assert "'module.' prefix removed" in out and "open_clip SigLIP" in out, out
    assert_same_tensors(read_folder(tmp_path / "out"), state)


def test_hidden_act_flag_sets_the_activation_and_silences_the_note(tmp_path, capsys):
    cfg = get_preset("google/siglip-base-patch16-224").replace(num_hidden_layers=1)
    torch.save(layouts.to_timm(synthetic_state_dict(cfg, seed=2), cfg), tmp_path / "model.pt")
    assert convert_main([str(tmp_path / "model.pt"), str(tmp_path / "a"), "--hidden-act", "gelu"]) == 0
    out = capsys.readouterr().out
    assert SiglipVisionConfig.from_pretrained(tmp_path / "a").hidden_act == "gelu"
    assert "exact GELU" not in out and "hidden_act gelu from --hidden-act" in out, out
    assert convert_main([str(tmp_path / "model.pt"), str(tmp_path / "b"), "--hidden-act", "relu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --hidden-act: invalid choice") and err.count("\n") == 1, err
    assert not (tmp_path / "b").exists()


class _Shapes:
    """Only what config inference reads: key names and shapes (a full so400m file is 1.6 GB)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]


def test_inferred_image_size_is_the_stated_or_the_presets_not_grid_times_patch():
    """so400m/14's 27x27 grid is 378 px by grid x patch, but the checkpoint is the 384-px one: the
    preprocessor must resize to 384 like google/siglip-so400m-patch14-384's does."""
    from siglip_scratch.convert.formats.timm import infer_config

    cfg = get_preset("google/siglip-so400m-patch14-384")
    one = cfg.replace(num_hidden_layers=1)
    sd = layouts.to_timm(synthetic_state_dict(one), one)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    shapes.update(
        {
            k.replace("blocks.0.", f"blocks.{i}."): v
            for k, v in shapes.items()
            if k.startswith("blocks.0.")
            for i in range(1, 27)
        }
    )
    notes: list[str] = []
    got = infer_config(_Shapes(shapes), "", None, notes)
    assert got == cfg, got
    assert notes == [
        "image_size 384 as google/siglip-so400m-patch14-384 (a 27x27 grid of 14-px patches fits 378–391 px)"
    ]
    notes.clear()
    assert infer_config(_Shapes(shapes), "", 380, notes).image_size == 380 and "timm config" in notes[0]
    with pytest.raises(ConfigError, match="does not fit the 27x27 position grid"):
        infer_config(_Shapes(shapes), "", 400, [])
    # A shape no preset has keeps grid x patch, with nothing to say.
    small = {k: v for k, v in shapes.items() if not k.startswith(tuple(f"blocks.{i}." for i in range(1, 27)))}
    notes.clear()
    assert infer_config(_Shapes(small), "", None, notes).image_size == 378 and notes == []


def test_timm_of_unknown_width_needs_and_takes_config(tmp_path, capsys):
    cfg = TINY.replace(hidden_size=96, num_attention_heads=6)  # width 96: not a known SigLIP head count
    state = synthetic_state_dict(cfg, seed=3)
    torch.save(layouts.to_timm(state, cfg), tmp_path / "model.pt")
    assert convert_main([str(tmp_path / "model.pt"), str(tmp_path / "a")]) == 2
    assert "cannot infer the head count" in capsys.readouterr().err
    cfg.save_pretrained(tmp_path)
    assert (
        convert_main([str(tmp_path / "model.pt"), str(tmp_path / "b"), "--config", str(tmp_path / "config.json")]) == 0
    )
    assert SiglipVisionConfig.from_pretrained(tmp_path / "b") == cfg
    assert_same_tensors(read_folder(tmp_path / "b"), state)


# -- hub: a cache built here, and a hub served on 127.0.0.1 ---------------------------------------------------
# huggingface_hub reads HF_* variables when it is imported, so these run the real CLI in a subprocess
# with the environment a user would have.


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "siglip_scratch.convert.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=600,
    )


@pytest.mark.hub
def test_hub_cache_offline_minimal_config(tmp_path, hf):
    """The real cache layout of google/siglip-base-patch16-224: full SiglipModel, minimal vision_config."""
    cfg = get_preset("google/siglip-base-patch16-224")
    state = synthetic_state_dict(cfg, seed=9)
    weights = tmp_path / "weights.safetensors"
    save_file({**state, **layouts.text_tower()}, str(weights), metadata={"format": "pt"})
    hub_config = {"model_type": "siglip", "vision_config": {"patch_size": 16}, "text_config": {}}
    cache = tmp_path / "hub"
    snap = layouts.write_hub_cache(
        cache,
        "google/siglip-base-patch16-224",
        {"config.json": json.dumps(hub_config).encode(), "model.safetensors": weights},
    )
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("google/siglip-base-patch16-224", str(tmp_path / "out"), "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(read_folder(tmp_path / "out"), state)
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert record["source"]["kind"] == "hub" and record["source"]["repo_id"] == "google/siglip-base-patch16-224"
    assert record["source"]["commit"] == snap.name
    blob = (snap / "model.safetensors").resolve().name
    assert any(e["sha256"] == blob for e in record["inputs"]), "the hub blob hash was not reused"
    check_loads_everywhere(tmp_path / "out", state, cfg, hf)
    # The same cache serves SiglipVisionModel.from_pretrained(hub id) and siglip-parity --model.
    code = (
        "import torch, siglip_scratch as s; m = s.SiglipVisionModel.from_pretrained('google/siglip-base-patch16-224');"
        "print(m.config == s.get_preset('google/siglip-base-patch16-224'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "siglip_scratch.parity.cli",
            "--model",
            "google/siglip-base-patch16-224",
            "--batch",
            "1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(real)" in proc.stdout and "PASS: all 63 sites exact" in proc.stdout, proc.stdout


@covers("S04")
@pytest.mark.hub
def test_hub_offline_with_nothing_cached(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("google/siglip-base-patch16-224", str(tmp_path / "out"), env=env)
    assert proc.returncode == 2 and "not in the local cache" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture
def fake_hub(tmp_path):
    hub = FakeHub().start()
    hub.env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "HF_HUB_OFFLINE": "0"}
    yield hub
    hub.stop()


def sharded_siglip_repo(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """A full SiglipModel in two shards: vision in the first, text only in the second."""
    from safetensors.torch import save

    text = layouts.text_tower()
    s1, s2 = save(state, metadata={"format": "pt"}), save(text, metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(state, "model-00001-of-00002.safetensors")}
    weight_map.update(dict.fromkeys(text, "model-00002-of-00002.safetensors"))
    config = {"model_type": "siglip", "vision_config": TINY.to_dict(), "text_config": {}}
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors.index.json": json.dumps({"metadata": {}, "weight_map": weight_map}).encode(),
        "model-00001-of-00002.safetensors": s1,
        "model-00002-of-00002.safetensors": s2,
        "preprocessor_config.json": json.dumps({"resample": 3, "size": {"height": 32, "width": 32}}).encode(),
    }


@pytest.mark.hub
def test_hub_download_fetches_only_vision_shards(tmp_path, fake_hub, state):
    repo = "acme/siglip-tiny"
    commit = fake_hub.add_repo(repo, sharded_siglip_repo(state))
    proc = run_cli(repo, str(tmp_path / "out"), env=fake_hub.env)
    assert proc.returncode == 0, proc.stderr
    assert f"commit {commit}" in proc.stdout
    assert fake_hub.bytes_served(repo, "model-00001-of-00002.safetensors") > 0
    assert fake_hub.bytes_served(repo, "model-00002-of-00002.safetensors") == 0, "the text-only shard was fetched"
    assert not any(p.endswith("model-00002-of-00002.safetensors") for _, p in fake_hub.requests)
    assert_same_tensors(read_folder(tmp_path / "out"), state)
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["resample"] == 3
    # By default the shard was read in ranges (not cached: a partial file is not a blob). --full-download
    # downloads it whole into the cache, and from then on the cached shard is used: no new body bytes.
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert [e["sha256_checked"] for e in record["inputs"] if "sha256_checked" in e] == [False]
    shard_bytes = len(sharded_siglip_repo(state)["model-00001-of-00002.safetensors"])
    ranged = fake_hub.bytes_served(repo, "model-00001-of-00002.safetensors")
    assert run_cli(repo, str(tmp_path / "full"), "--quiet", "--full-download", env=fake_hub.env).returncode == 0
    assert fake_hub.bytes_served(repo, "model-00001-of-00002.safetensors") == ranged + shard_bytes
    assert "sha256_checked" not in (tmp_path / "full" / "conversion.json").read_text()
    before = sum(fake_hub.served.values())
    assert run_cli(repo, str(tmp_path / "again"), "--quiet", env=fake_hub.env).returncode == 0
    assert sum(fake_hub.served.values()) == before
    assert "sha256_checked" not in (tmp_path / "again" / "conversion.json").read_text()


@pytest.mark.hub
def test_hub_sharded_pytorch_bin_fetches_and_opens_only_vision_shards(tmp_path, fake_hub, state):
    """A repo that ships only a sharded pytorch_model.bin: the text shard is never downloaded, and the
    store must not try to open it."""
    import io

    def pickled(tensors):
        buf = io.BytesIO()
        torch.save(tensors, buf)
        return buf.getvalue()

    text = layouts.text_tower()
    weight_map = {**dict.fromkeys(state, "pytorch_model-00001-of-00002.bin")}
    weight_map.update(dict.fromkeys(text, "pytorch_model-00002-of-00002.bin"))
    config = {"model_type": "siglip", "vision_config": TINY.to_dict(), "text_config": {}}
    repo = "acme/siglip-bin"
    fake_hub.add_repo(
        repo,
        {
            "config.json": json.dumps(config).encode(),
            "pytorch_model.bin.index.json": json.dumps({"metadata": {}, "weight_map": weight_map}).encode(),
            "pytorch_model-00001-of-00002.bin": pickled(state),
            "pytorch_model-00002-of-00002.bin": pickled(text),
        },
    )
    proc = run_cli(repo, str(tmp_path / "out"), env=fake_hub.env)
    assert proc.returncode == 0, proc.stderr
    assert fake_hub.bytes_served(repo, "pytorch_model-00002-of-00002.bin") == 0
    assert_same_tensors(read_folder(tmp_path / "out"), state)


@covers("S01", "S03")
@pytest.mark.hub
def test_hub_revision_and_errors(tmp_path, fake_hub, state):
    repo = "acme/siglip-tiny"
    commit = fake_hub.add_repo(repo, sharded_siglip_repo(state))
    proc = run_cli(repo, str(tmp_path / "out"), "--revision", commit, "--quiet", env=fake_hub.env)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert (record["source"]["revision"], record["source"]["commit"]) == (commit, commit)
    for args, needle in (
        (["acme/nope"], "repo not found"),
        ([repo, "--revision", "v9"], "revision not found"),
    ):
        proc = run_cli(args[0], str(tmp_path / "bad"), *args[1:], env=fake_hub.env)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and not (tmp_path / "bad").exists()


# -- the output folder and the CLI ----------------------------------------------------------------------------
@covers("O01")
def test_existing_output_refused_without_force(tmp_path, state, capsys):
    src = _hf_folder(tmp_path, state, TINY.to_dict())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = convert_main([str(src), str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "not empty" in err and "--force" in err and err.count("\n") == 1
    assert (out / "keep.txt").read_text() == "mine"
    assert convert_main([str(src), str(out), "--force", "--quiet"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if "siglip-convert" in p.name] == []


def test_empty_existing_output_is_fine(tmp_path, state):
    src = _hf_folder(tmp_path, state, TINY.to_dict())
    (tmp_path / "out").mkdir()
    convert(str(src), tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


@covers("C05")
def test_nonfinite_weights(tmp_path, state, capsys):
    bad = dict(state)
    bad[V + "encoder.layers.1.mlp.fc1.weight"] = bad[V + "encoder.layers.1.mlp.fc1.weight"].clone()
    bad[V + "encoder.layers.1.mlp.fc1.weight"][3, 5] = float("nan")
    src = _hf_folder(tmp_path, bad, TINY.to_dict())
    rc = convert_main([str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "NaN or Inf" in err and "encoder.layers.1.mlp.fc1.weight" in err and "--allow-nonfinite" in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert convert_main([str(src), str(tmp_path / "out"), "--allow-nonfinite", "--quiet"]) == 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["/nonexistent/x.safetensors", "OUT"], "no such file or folder"),
        (["not a repo id!", "OUT"], "not a file, a folder or a hub repo id"),
        (["SRC", "OUT", "--max-shard-size", "lots"], "cannot read size 'lots'"),
        (["SRC/model.safetensors.txt", "OUT"], "unknown weights format"),
    ],
)
@covers("S10")
def test_cli_input_errors_exit_2(tmp_path, state, argv, needle, capsys):
    src = _hf_folder(tmp_path, state, TINY.to_dict())
    (src / "model.safetensors.txt").write_text("x")
    argv = [a.replace("SRC", str(src)).replace("OUT", str(tmp_path / "out")) for a in argv]
    rc = convert_main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_loader_and_converter_pick_the_same_file(tmp_path, state):
    """A folder with both model.safetensors and an index: both take model.safetensors (transformers' order)."""
    src = _hf_folder(tmp_path, state, TINY.to_dict())
    other = {k: v + 1 for k, v in state.items()}
    layouts.save_sharded(src, {"model-00001-of-00001.safetensors": other})
    assert (src / "model.safetensors.index.json").is_file()
    convert(str(src), tmp_path / "out", log=lambda s: None)
    assert_same_tensors(read_folder(tmp_path / "out"), state)
    loaded = SiglipVisionModel.from_pretrained(src).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_unwritable_output_place_is_exit_2_one_line(tmp_path, state, capsys):
    """/proc passes os.access for root but refuses files: refused before any work, no traceback."""
    src = _hf_folder(tmp_path, state, TINY.to_dict())
    rc = convert_main([str(src), "/proc/siglip-out", "--quiet"])
    err = capsys.readouterr().err
    assert (
        rc == 2
        and err.startswith("error: cannot create files in the output's parent folder (")
        and err.count("\n") == 1
    ), err


def test_cli_verify_pass_and_fail_exit_codes(tmp_path, state, capsys, monkeypatch, hf):
    src = _hf_folder(tmp_path, state, TINY.to_dict())
    assert convert_main([str(src), str(tmp_path / "a"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "PASS: every tensor equals its source" in out and "transformers: PASS: all 13 sites exact" in out
    from siglip_scratch.convert import verify

    monkeypatch.setattr(verify, "verify_output", lambda folder, **kw: (False, "verify: FAIL: planted"))
    assert convert_main([str(src), str(tmp_path / "b"), "--verify"]) == 1
