"""Our encoder against transformers.SiglipVisionModel: key sets, shapes, and bit-exact outputs."""

import pytest
import torch

from siglip_scratch import InputError, SiglipVisionModel, get_preset
from siglip_scratch.modeling import expected_shapes
from siglip_scratch.parity.reference import build_reference, canonical_name, reference_prefix

from .catalogue import covers
from .conftest import TINY, TINY_ODD, assert_close, assert_exact, pixels


@pytest.mark.parametrize(
    "preset",
    ["google/siglip-base-patch16-224", "google/siglip-so400m-patch14-384", "google/paligemma-3b-pt-224"],
)
def test_key_set_and_shapes_equal_transformers(preset, hf):
    cfg = get_preset(preset)
    fields = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        theirs = hf.SiglipVisionModel(hf.SiglipVisionConfig(**fields))
    prefix = reference_prefix(theirs)
    their_shapes = {canonical_name(k, prefix): tuple(v.shape) for k, v in theirs.state_dict().items()}
    ours = expected_shapes(cfg)
    assert sorted(set(ours) ^ set(their_shapes)) == [], "key sets differ"
    bad = {k: (ours[k], their_shapes[k]) for k in ours if ours[k] != their_shapes[k]}
    assert bad == {}, f"shape mismatches (ours, theirs): {bad}"


def test_no_buffers_in_state_dict():
    model = SiglipVisionModel.from_config(TINY)
    assert list(model.buffers()) == []
    assert set(model.state_dict()) == {k for k, _ in model.named_parameters()}


@pytest.mark.parametrize(
    "cfg", [TINY, TINY_ODD, get_preset("google/siglip-base-patch16-224")], ids=["tiny", "odd", "base"]
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 4])
def test_float32_cpu_bit_exact(cfg, attn, batch, hf):
    ours = SiglipVisionModel.from_config(cfg, seed=3, attn_implementation=attn)
    ref = build_reference(cfg, ours.state_dict(), attn_implementation=attn)
    x = pixels(cfg, batch, seed=batch)
    with torch.inference_mode():
        a = ours(x, output_hidden_states=True)
        b = ref(x, output_hidden_states=True)
    assert_exact(a.last_hidden_state, b.last_hidden_state, "last_hidden_state")
    assert_exact(a.pooler_output, b.pooler_output, "pooler_output")
    # transformers 4.57 returns embeddings + every layer output; 5.x the same layer outputs with
    # embeddings first. Compare the common prefix of raw (pre-post_layernorm) states.
    assert len(a.hidden_states) == cfg.num_hidden_layers + 1
    for i, (h_a, h_b) in enumerate(zip(a.hidden_states, b.hidden_states, strict=True)):
        assert_exact(h_a, h_b, f"hidden_states[{i}]")


def test_weights_are_shared_with_the_reference(hf):
    ours = SiglipVisionModel.from_config(TINY)
    ref = build_reference(TINY, ours.state_dict())
    ours_ptrs = {p.data_ptr() for p in ours.parameters()}
    assert {p.data_ptr() for p in ref.parameters()} == ours_ptrs


def test_no_head_model(hf):
    cfg = TINY.replace(vision_use_head=False)
    ours = SiglipVisionModel.from_config(cfg)
    ref = build_reference(cfg, ours.state_dict())
    x = pixels(cfg, 2)
    with torch.inference_mode():
        a, b = ours(x), ref(x)
    assert a.pooler_output is None and b.pooler_output is None
    assert_exact(a.last_hidden_state, b.last_hidden_state, "last_hidden_state")


def test_gelu_exact_variant(hf):
    cfg = TINY.replace(hidden_act="gelu")
    ours = SiglipVisionModel.from_config(cfg)
    ref = build_reference(cfg, ours.state_dict())
    x = pixels(cfg, 2)
    with torch.inference_mode():
        assert_exact(ours(x).pooler_output, ref(x).pooler_output, "pooler_output")


@pytest.mark.parametrize("size", [48, 64])
def test_interpolate_pos_encoding_matches_transformers(size, hf):
    ours = SiglipVisionModel.from_config(TINY, seed=5)
    ref = build_reference(TINY, ours.state_dict())
    x = pixels(TINY, 2, size=size)
    with torch.inference_mode():
        a = ours(x, interpolate_pos_encoding=True)
        b = ref(x, interpolate_pos_encoding=True)
    assert a.last_hidden_state.shape[1] == (size // TINY.patch_size) ** 2
    assert_exact(a.last_hidden_state, b.last_hidden_state, f"last_hidden_state at {size}px")
    assert_exact(a.pooler_output, b.pooler_output, f"pooler_output at {size}px")


def test_interpolate_at_native_size_is_identity():
    model = SiglipVisionModel.from_config(TINY)
    x = pixels(TINY, 1)
    with torch.inference_mode():
        assert_exact(model(x, interpolate_pos_encoding=True).pooler_output, model(x).pooler_output, "pooler")


# Half-precision runs against the float32 run of the same weights, as max |Δ| / max |x|.
# Measured (seed 7, batch 2; last_hidden_state / pooler_output):
#   bf16: tiny 1.10e-2 / 9.7e-3, base 1.59e-2 / 1.11e-2, so400m-224 2.30e-2 / 7.5e-3
#   fp16: tiny 1.36e-3 / 9.9e-4, base 1.96e-3 / 1.09e-3, so400m-224 2.67e-3 / 8.9e-4
# The bounds leave ~2.5x margin over base.
HALF_TOLERANCE = {torch.bfloat16: 4e-2, torch.float16: 8e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [TINY, get_preset("google/siglip-base-patch16-224")], ids=["tiny", "base"])
def test_half_precision_agrees_with_float32(dtype, cfg):
    full = SiglipVisionModel.from_config(cfg, seed=7)
    half = SiglipVisionModel.from_config(cfg, seed=7, dtype=dtype)
    x = pixels(cfg, 2)
    with torch.inference_mode():
        a, b = full(x), half(x)
    assert b.last_hidden_state.dtype == dtype
    for name in ("last_hidden_state", "pooler_output"):
        ref, got = getattr(a, name), getattr(b, name).float()
        scale = ref.abs().max().item()
        assert_close(got / scale, ref / scale, HALF_TOLERANCE[dtype], f"{name} {dtype} (relative to max |x|)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bit_exact_with_transformers(dtype, hf):
    ours = SiglipVisionModel.from_config(TINY, seed=2, dtype=dtype)
    ref = build_reference(TINY, ours.state_dict())
    x = pixels(TINY, 2)
    with torch.inference_mode():
        assert_exact(ours(x).pooler_output, ref(x).pooler_output, f"pooler_output {dtype}")


def test_inference_mode_eval_and_grad():
    model = SiglipVisionModel.from_config(TINY)
    x = pixels(TINY, 2)
    with torch.inference_mode():
        out = model(x).pooler_output
    model.train()
    loss = model(x).pooler_output.sum()
    loss.backward()
    assert model.vision_model.head.probe.grad is not None
    model.eval()
    assert_exact(model(x).pooler_output.detach(), out, "eval after train")


@pytest.mark.parametrize(
    "x, needle",
    [
        (torch.zeros(2, 1, 32, 32), "expected 3 channels, got 1"),
        (torch.zeros(2, 3, 48, 48), "does not match the position table"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "must be floating point"),
        (torch.zeros(3, 32, 32), "add a batch dimension"),
        (torch.zeros(0, 3, 32, 32), "empty batch"),
        (torch.zeros(1, 3, 4, 4), "smaller than one 8x8 patch"),
        ([[0.0]], "must be a torch.Tensor"),
    ],
)
@covers("I08", "I09", "I10", "I11")
def test_bad_inputs_get_clear_errors(x, needle):
    model = SiglipVisionModel.from_config(TINY)
    with pytest.raises(InputError) as e:
        model(x)
    assert needle in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)


def test_attn_switch():
    model = SiglipVisionModel.from_config(TINY)
    x = pixels(TINY, 2)
    with torch.inference_mode():
        a = model(x).pooler_output
        b = model.set_attn_implementation("eager")(x).pooler_output
    assert model.attn_implementation == "eager"
    assert_close(a, b, 1e-5, "sdpa vs eager")
    with pytest.raises(InputError, match="unknown attn_implementation"):
        model.set_attn_implementation("flash")


def test_synthetic_weights_are_deterministic_and_every_parameter_matters():
    a = SiglipVisionModel.from_config(TINY, seed=11).state_dict()
    b = SiglipVisionModel.from_config(TINY, seed=11).state_dict()
    c = SiglipVisionModel.from_config(TINY, seed=12).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert not torch.equal(a[k], c[k]), k
        if k.endswith("bias"):
            assert a[k].abs().min() > 0 or a[k].abs().mean() > 1e-3, f"{k} is ~zero"
        if "norm" in k and k.endswith("weight"):
            assert a[k].std() > 0.05, f"{k} is ~constant"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_transformers(dtype, hf):
    ours = SiglipVisionModel.from_config(TINY, dtype=dtype, device="cuda")
    ref = build_reference(TINY, ours.state_dict())
    x = pixels(TINY, 2).cuda()
    with torch.inference_mode():
        assert_exact(ours(x).pooler_output, ref(x).pooler_output, f"cuda {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooling_attention_mirrors_torch(dtype):
    """Our MAP-head attention copies torch's nn.MultiheadAttention arithmetic; a torch upgrade that
    changes it must fail here, loudly, rather than as a distant pooler_output mismatch."""
    from siglip_scratch.model import _PoolingAttention

    torch.manual_seed(0)
    dim, heads, B, S = 96, 4, 3, 17
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).to(dtype).eval()
    ours = _PoolingAttention(dim, heads).to(dtype)
    ours.load_state_dict(mha.state_dict(), strict=True)
    q, kv = torch.randn(B, 1, dim, dtype=dtype), torch.randn(B, S, dim, dtype=dtype)
    with torch.inference_mode():
        want = mha(q, kv, kv, need_weights=True)[0]
        got = ours(q, kv)
    assert_exact(got, want, f"_PoolingAttention vs nn.MultiheadAttention ({dtype}, torch {torch.__version__})")
