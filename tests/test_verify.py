"""``siglip-convert --verify`` checks the output against the *source*: planted converter bugs are named.

Each bug is planted in the converter's own table or plan (what a wrong edit would do), so the folder
it writes loads and runs everywhere and agrees with itself; only a check against the source sees it.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from siglip_scratch import get_preset
from siglip_scratch.convert import tables
from siglip_scratch.convert.cli import main as convert_main
from siglip_scratch.convert.formats import big_vision, timm
from siglip_scratch.convert.formats import hf as hf_format
from siglip_scratch.modeling import synthetic_state_dict

from . import layouts
from .conftest import TINY

L0 = "vision_model.encoder.layers.0."


def _swap_rows(table, a: str, b: str):
    """The table with the sources of the rows whose targets end in ``a`` and ``b`` exchanged."""
    rows = list(table)
    ia = [i for i, r in enumerate(rows) if r.target.endswith(a)]
    ib = [i for i, r in enumerate(rows) if r.target.endswith(b)]
    for i, j in zip(ia, ib, strict=True):
        rows[i], rows[j] = (
            dataclasses.replace(rows[i], sources=rows[j].sources),
            dataclasses.replace(rows[j], sources=rows[i].sources),
        )
    return rows


@pytest.fixture
def npz(tmp_path):
    state = synthetic_state_dict(TINY, seed=4)
    np.savez(tmp_path / "ckpt.npz", **layouts.to_big_vision(state, TINY))
    return tmp_path / "ckpt.npz"


def test_verify_passes_a_correct_big_vision_conversion(npz, tmp_path, capsys, hf):
    assert convert_main([str(npz), str(tmp_path / "out"), "--verify", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "source check (big_vision computed natively" in out and "PASS: every leaf reproduces the source" in out
    assert "verify: parity of the output with transformers: PASS" in out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_verify_passes_a_cast_conversion(npz, tmp_path, dtype, capsys, hf):
    assert convert_main([str(npz), str(tmp_path / "out"), "--verify", "--quiet", "--dtype", dtype]) == 0
    assert "PASS: every leaf reproduces the source" in capsys.readouterr().out


def test_verify_names_q_k_swapped_in_the_big_vision_table(npz, tmp_path, capsys, monkeypatch, hf):
    bad = _swap_rows(big_vision.TABLE, "self_attn.q_proj.weight", "self_attn.k_proj.weight")
    bad = _swap_rows(bad, "self_attn.q_proj.bias", "self_attn.k_proj.bias")
    monkeypatch.setattr(big_vision, "TABLE", bad)
    rc = convert_main([str(npz), str(tmp_path / "out"), "--verify", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1, out
    first = next(line for line in out.splitlines() if "source check" in line)
    assert f"FAIL: {L0}self_attn.q_proj.{{bias,weight}}" in first, first
    assert "img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel" in first, first
    # The folder agrees with itself, which is why the old --verify said PASS.
    assert "verify: parity of the output with transformers: PASS" in out


def test_verify_names_a_conv_kernel_with_h_and_w_swapped(tmp_path, capsys, monkeypatch, hf):
    state = synthetic_state_dict(TINY, seed=4)
    np.savez(tmp_path / "ckpt.npz", **layouts.to_big_vision(state, TINY))
    rows = [
        dataclasses.replace(r, transform=lambda xs: xs[0].permute(3, 2, 1, 0))  # HWIO -> OIWH: H and W swapped
        if r.target == "vision_model.embeddings.patch_embedding.weight"
        else r
        for r in big_vision.TABLE
    ]
    monkeypatch.setattr(big_vision, "TABLE", rows)
    rc = convert_main([str(tmp_path / "ckpt.npz"), str(tmp_path / "out"), "--verify", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL: vision_model.embeddings.patch_embedding.{bias,weight}" in out and "img/embedding/kernel" in out


def test_verify_names_q_k_swapped_in_the_timm_table(tmp_path, capsys, monkeypatch, hf):
    cfg = get_preset("google/siglip-base-patch16-224").replace(num_hidden_layers=2)
    state = synthetic_state_dict(cfg, seed=8)
    torch.save(layouts.to_timm(state, cfg), tmp_path / "model.pt")
    assert convert_main([str(tmp_path / "model.pt"), str(tmp_path / "good"), "--verify", "--quiet"]) == 0
    assert "PASS: every leaf reproduces the source" in capsys.readouterr().out
    rows = [
        dataclasses.replace(r, transform=tables.chunk(1 - "qk".index(r.target.split(".")[-2][0]), 3))
        if r.target.endswith(("q_proj.weight", "k_proj.weight"))
        else r
        for r in timm.TABLE
    ]
    monkeypatch.setattr(timm, "TABLE", rows)
    rc = convert_main([str(tmp_path / "model.pt"), str(tmp_path / "bad"), "--verify", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1 and f"FAIL: {L0}self_attn.q_proj.{{bias,weight}}" in out and "blocks.0.attn.qkv.weight" in out, out


def test_verify_names_a_hf_tensor_taken_from_another_layer(tmp_path, capsys, monkeypatch, hf):
    state = synthetic_state_dict(TINY, seed=4)
    src = tmp_path / "src"
    src.mkdir()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(TINY.to_dict()))
    assert convert_main([str(src), str(tmp_path / "good"), "--verify", "--quiet"]) == 0
    assert "PASS: every tensor equals its source" in capsys.readouterr().out

    real = hf_format.hf_layout

    def shifted(store):  # layer 0's fc1 weight read from layer 1 (data only; the key stays)
        layout, planned, used, drops, notes = real(store)
        by_key = {p.key: p for p in planned}
        a, b = by_key[L0 + "mlp.fc1.weight"], by_key["vision_model.encoder.layers.1.mlp.fc1.weight"]
        a.make, a.raw = b.make, b.raw
        return layout, planned, used, drops, notes

    monkeypatch.setattr(hf_format, "hf_layout", shifted)
    rc = convert_main([str(src), str(tmp_path / "bad"), "--verify", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1 and f"FAIL: {L0}mlp.fc1.weight differs from the source's {L0}mlp.fc1.weight" in out, out
