"""Property-based fuzzing of every reader: random and mutated inputs raise only our typed errors.

Profiles (tests/conftest.py): ``ci`` (default, seconds) and ``fuzz`` (``make fuzz``, many examples).
A per-example deadline turns a hang into a failure.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from siglip_scratch import ConfigError, SiglipImageProcessor, SiglipScratchError, SiglipVisionConfig
from siglip_scratch.checkpoint import read_index, read_safetensors_header
from siglip_scratch.convert import convert
from siglip_scratch.convert.stores import SafetensorsStore
from siglip_scratch.modeling import synthetic_state_dict
from siglip_scratch.parity.sites import compile_rename

from . import layouts
from .conftest import TINY

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
NO_TMP_FIXTURE = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _valid_safetensors() -> bytes:
    g = torch.Generator().manual_seed(0)
    return save({"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16)})


VALID = _valid_safetensors()


def _read_all(path: Path) -> None:
    store = SafetensorsStore(path, vision_only=False)
    for key in store.keys():
        store.load(key)


@NO_TMP_FIXTURE
@given(data=st.binary(max_size=256))
def test_fuzz_safetensors_random_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(data)
        try:
            _read_all(path)
        except SiglipScratchError:
            pass


@NO_TMP_FIXTURE
@given(
    cuts=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
    truncate=st.one_of(st.none(), st.integers(0, len(VALID))),
    header_len=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_fuzz_safetensors_mutated(cuts, truncate, header_len):
    data = bytearray(VALID)
    for pos, value in cuts:
        data[pos] = value
    if header_len is not None:
        data[:8] = struct.pack("<Q", header_len)
    if truncate is not None:
        data = data[:truncate]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(bytes(data))
        try:
            _read_all(path)
        except SiglipScratchError:
            pass


@NO_TMP_FIXTURE
@given(header=json_values)
def test_fuzz_safetensors_header_json(header):
    raw = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
        try:
            read_safetensors_header(path)
        except SiglipScratchError:
            pass


@NO_TMP_FIXTURE
@given(index=json_values | st.fixed_dictionaries({"weight_map": json_values}))
def test_fuzz_index_json(index):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors.index.json"
        path.write_text(json.dumps(index))
        try:
            read_index(path)
        except SiglipScratchError:
            pass


VISION_KEYS = [*SiglipVisionConfig().to_dict(), "vision_config", "model_type", "text_config"]


@given(
    data=st.dictionaries(st.sampled_from(VISION_KEYS) | st.text(max_size=6), json_values, max_size=8),
    nested=st.booleans(),
    model_type=st.sampled_from([None, "siglip", "paligemma", "siglip_vision_model", "siglip2", "x"]),
)
def test_fuzz_config_json(data, nested, model_type):
    doc = {"vision_config": data} if nested else dict(data)
    if model_type is not None:
        doc["model_type"] = model_type
    try:
        SiglipVisionConfig.from_dict(doc)
    except ConfigError:
        pass


@given(
    data=st.dictionaries(
        st.sampled_from(
            [
                "size",
                "resample",
                "image_mean",
                "image_std",
                "do_resize",
                "do_rescale",
                "rescale_factor",
                "do_normalize",
                "do_convert_rgb",
                "transparency",
            ]
        ),
        json_values,
        max_size=6,
    )
)
def test_fuzz_preprocessor_config(data):
    try:
        SiglipImageProcessor.from_dict(data)
    except SiglipScratchError:
        pass


@given(
    spec=json_values
    | st.fixed_dictionaries({"rename": st.lists(st.lists(st.text(max_size=10), max_size=3), max_size=4)})
)
def test_fuzz_rename_map(spec):
    try:
        rules = compile_rename(spec, "map.json")
    except SiglipScratchError:
        return
    for pattern, repl in rules:
        pattern.sub(repl, "blocks.3.attn")


BV_STATE = layouts.to_big_vision(synthetic_state_dict(TINY), TINY)
BV_SCANNED = layouts.to_big_vision(synthetic_state_dict(TINY), TINY, scanned=True)
BV_KEYS = sorted(BV_STATE)
DTYPES = [np.float32, np.float16, np.int32, "V2", "V4", np.float64]


@NO_TMP_FIXTURE
@given(
    drop=st.sets(st.sampled_from(BV_KEYS), max_size=3),
    reshape=st.dictionaries(st.sampled_from(BV_KEYS), st.lists(st.integers(0, 5), max_size=4), max_size=3),
    retype=st.dictionaries(st.sampled_from(BV_KEYS), st.sampled_from(DTYPES), max_size=2),
    extra=st.dictionaries(st.text("abcdefghij/_0123456789", min_size=1, max_size=20), st.integers(0, 3), max_size=2),
    scan=st.booleans(),
)
def test_fuzz_npz_layouts(drop, reshape, retype, extra, scan):
    arrays = dict(BV_SCANNED if scan else BV_STATE)
    for k in drop:
        arrays.pop(k, None)
    for k, shape in reshape.items():  # keys of the per-block layout; absent in the scanned one
        if k in arrays:
            arrays[k] = np.zeros(shape, np.float32)
    for k, dt in retype.items():
        if k in arrays:
            arrays[k] = _as(arrays[k], dt)
    for k, n in extra.items():
        arrays[k] = np.zeros((n,), np.float32)
    with tempfile.TemporaryDirectory() as d:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        (Path(d) / "x.npz").write_bytes(buf.getvalue())
        try:
            convert(str(Path(d) / "x.npz"), Path(d) / "out")
        except SiglipScratchError:
            pass


def _as(arr: np.ndarray, dt) -> np.ndarray:
    """Zeros of the same shape, reinterpreted as another dtype (``V4`` stands for a wrong-size bf16)."""
    dt = np.dtype(dt)
    n = max(1, arr.size)
    raw = np.zeros(n * dt.itemsize, np.uint8)
    return raw.view(dt)[:n].reshape(arr.shape) if arr.size else np.zeros(arr.shape, dt)


@NO_TMP_FIXTURE
@given(
    cuts=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
    truncate=st.one_of(st.none(), st.floats(0, 1)),
)
def test_fuzz_npz_bytes(cuts, truncate):
    buf = io.BytesIO()
    np.savez(buf, **BV_STATE)
    data = bytearray(buf.getvalue())
    for where, value in cuts:
        data[int(where * len(data))] = value
    if truncate is not None:
        data = data[: int(truncate * len(data))]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "x.npz").write_bytes(bytes(data))
        try:
            convert(str(Path(d) / "x.npz"), Path(d) / "out")
        except SiglipScratchError:
            pass
