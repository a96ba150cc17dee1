"""State and batch bugs are caught (the real-ports issue, item 3): a candidate that memoises by the input's
identity, or mixes the images of a batch, failed nothing before (every run fed one input object; ``--batch 1``
had no second image). The truth is computed without the harness: the candidate run on two different inputs in a
row, against our (exact) encoder on each."""

from __future__ import annotations

import pytest
import torch

from siglip_scratch import SiglipVisionModel
from siglip_scratch.modeling import synthetic_state_dict
from siglip_scratch.parity import Weights, compare

from .test_ports_people_write import SMALL

L = "vision_model.encoder.layers"


@pytest.fixture(scope="module")
def weights() -> Weights:
    return Weights(SMALL, synthetic_state_dict(SMALL, seed=0), "small (seed 0)", synthetic=True)


def memoised(cfg: dict) -> SiglipVisionModel:
    """Caches the embeddings by the pixel tensor's identity ("they are expensive and the input never changes")."""
    model = SiglipVisionModel.from_config(SMALL, seed=1)
    emb = model.vision_model.embeddings
    forward, cache = emb.forward, {}

    def cached(pixel_values, *args, **kwargs):
        key = id(pixel_values)
        if key not in cache:
            cache[key] = forward(pixel_values, *args, **kwargs)
        return cache[key]

    emb.forward = cached
    return model


def mixing(layer: int):
    def build(cfg: dict) -> SiglipVisionModel:
        """One MLP adds a little of the batch mean minus the image itself: every image sees the others (and a
        batch of one is untouched, so only a second image can show it)."""
        model = SiglipVisionModel.from_config(SMALL, seed=1)
        mlp = model.vision_model.encoder.layers[layer].mlp
        forward = mlp.forward
        mlp.forward = lambda h: forward(h) + 0.05 * (h.mean(0, keepdim=True) - h)
        return model

    build.__qualname__ = f"mixing in layer {layer}"
    return build


def _wrong_without_the_harness(factory, weights: Weights, batch: int) -> bool:
    """The candidate on two inputs in a row, against our encoder: is any output wrong?"""
    cand = factory(SMALL.to_dict())
    cand.load_state_dict(weights.state_dict)
    ours = SiglipVisionModel.from_state_dict(SMALL, weights.state_dict)
    g = torch.Generator().manual_seed(3)
    wrong = False
    x = torch.rand(batch, 3, SMALL.image_size, SMALL.image_size, generator=g) * 2 - 1
    with torch.inference_mode():
        for _ in range(2):
            want = ours(x.clone()).last_hidden_state
            got = cand(x).last_hidden_state
            wrong |= (got - want).abs().max().item() > 1e-3
            x.copy_(torch.rand(x.shape, generator=g) * 2 - 1)  # the same tensor object, new images
        one = torch.rand(1, 3, SMALL.image_size, SMALL.image_size, generator=g) * 2 - 1
        pair = torch.cat([one, torch.rand(1, 3, SMALL.image_size, SMALL.image_size, generator=g)])
        wrong |= (cand(pair).last_hidden_state[:1] - ours(one).last_hidden_state).abs().max().item() > 1e-3
    return wrong


@pytest.mark.parametrize("batch", [1, 2])
def test_memoised_by_identity_fails_as_state(batch, weights, hf):
    assert _wrong_without_the_harness(memoised, weights, batch)
    report = compare(weights=weights, candidate=memoised, batch=batch)
    assert not report.passed and report.batches["cause"] == "state", report.table()
    assert report.verdict.startswith("FAIL: state:"), report.verdict


@pytest.mark.parametrize("layer", [0, SMALL.num_hidden_layers - 1])
def test_batch_mixing_fails_at_batch_1_too(layer, weights, hf):
    """Was a false PASS with --batch 1 (one image has no neighbour); the check's fresh batch gives it one."""
    assert _wrong_without_the_harness(mixing(layer), weights, 1)
    report = compare(weights=weights, candidate=mixing(layer), batch=1)
    assert not report.passed and report.batches["cause"] == "batch mixing", report.table()
    at_two = compare(weights=weights, candidate=mixing(layer))
    assert not at_two.passed, at_two.table()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_honest_candidates_pass_the_batch_check(dtype, hf):
    state = synthetic_state_dict(SMALL, seed=0, dtype=getattr(torch, dtype))
    w = Weights(SMALL, state, f"small {dtype}", synthetic=True)
    for batch in (1, 2):
        report = compare(weights=w, dtype=dtype, batch=batch, depth="coarse")
        assert report.passed and report.batches["checked"] and report.batches["passed"], report.table()
