"""Shared fixtures: tiny configs, a transformers reference sharing our weights, exact comparisons."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from siglip_scratch import SiglipVisionConfig, SiglipVisionModel
from siglip_scratch.config import TINY_CONFIG

# Fuzzing budgets: `ci` for `make test` (seconds), `fuzz` for `make fuzz` (a longer campaign).
# `ci` is derandomised: the same examples on every run and every machine, so `make test` cannot fail
# by the luck of a seed (the random search, with its example database, belongs to `make fuzz`; a find
# there becomes a test of its own). No deadline: an example's time is not what is judged, and on a busy
# 2-core machine a slow example can make Hypothesis fail a correct result (DeadlineExceeded, "unreliable timings").
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("fuzz", max_examples=2000, deadline=10000, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Under pytest-xdist (`make test` runs two workers) each worker computes on one thread: two workers of two threads
# on two cores spend their time waiting for each other (measured: 12.5 min against 9.5 min for one process).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

TINY = TINY_CONFIG
# head_dim 18 and an odd grid: catches reshapes that only work for "nice" sizes.
TINY_ODD = SiglipVisionConfig(
    hidden_size=72, intermediate_size=100, num_hidden_layers=3, num_attention_heads=4, image_size=42, patch_size=14
)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_exact(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not torch.equal(a, b):
        raise AssertionError(f"{what}: not bit-identical, max |Δ| = {max_abs(a, b):.3e}")


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str) -> float:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    d = max_abs(a, b)
    assert d <= atol, f"{what}: max |Δ| = {d:.3e} > tolerance {atol:.1e}"
    return d


def pixels(config: SiglipVisionConfig, batch: int, seed: int = 0, size: int | None = None) -> torch.Tensor:
    s = size or config.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.num_channels, s, s, generator=g) * 2 - 1


@pytest.fixture
def tiny_model() -> SiglipVisionModel:
    return SiglipVisionModel.from_config(TINY, seed=0)


def pytest_collection_modifyitems(config, items):
    # A test that asks for the `transformers` fixture needs the reference installed.
    for item in items:
        if "hf" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.transformers)


def require_transformers():
    """transformers, the reference. Under `make test` (SIGLIP_REQUIRE_TRANSFORMERS=1) its absence
    fails the test instead of skipping it, so a broken install cannot pass silently."""
    if os.environ.get("SIGLIP_REQUIRE_TRANSFORMERS") == "1":
        import transformers

        return transformers
    return pytest.importorskip("transformers")


@pytest.fixture
def hf():
    """transformers (see `require_transformers`)."""
    return require_transformers()
