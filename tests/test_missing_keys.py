"""Every checkpoint reader, every required tensor deleted in turn: a one-line input error naming it, exit 2.

A reader that looks a key up before checking it is there (``store.shape(root + "embedding/kernel")``)
used to end in ``internal error: KeyError`` (exit 3). Deleting each key of a complete tower, one at a
time, reaches every such lookup, whatever order the reader checks things in.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from siglip_scratch import SiglipScratchError
from siglip_scratch.config import Siglip2VisionConfig
from siglip_scratch.convert import cli
from siglip_scratch.convert.sources import plan_conversion
from siglip_scratch.modeling import synthetic_state_dict

from . import layouts
from .catalogue import covers
from .conftest import TINY

NAFLEX = Siglip2VisionConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4, num_patches=16
)


def _npz(arrays: dict[str, np.ndarray], folder: Path) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = folder / "ckpt.npz"
    path.write_bytes(buf.getvalue())
    return path


def _safetensors(tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _hf_safetensors(tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    TINY.save_pretrained(folder)
    return _safetensors(tensors, folder)


def _hf_pickle(tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    TINY.save_pretrained(folder)
    path = folder / "pytorch_model.bin"
    torch.save(tensors, path)
    return path


# timm state dicts carry no head count; a known width (768 -> 12 heads) lets the reader infer the config.
TIMM_WIDE = TINY.replace(hidden_size=768, num_attention_heads=12, num_hidden_layers=1, image_size=32, patch_size=16)


def _timm_with_config(tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    (folder / "given").mkdir()
    TINY.save_pretrained(folder / "given")
    return _safetensors(tensors, folder)


def _readers() -> dict[str, tuple[dict, object]]:
    hf = synthetic_state_dict(TINY)
    return {
        "big_vision": (layouts.to_big_vision(hf, TINY), _npz),
        "big_vision scanned": (layouts.to_big_vision(hf, TINY, scanned=True), _npz),
        "big_vision NaFlex": (layouts.to_big_vision(synthetic_state_dict(NAFLEX), NAFLEX), _npz),
        "HF safetensors": (hf, _hf_safetensors),
        "HF pickle": (hf, _hf_pickle),
        "timm (config inferred)": (layouts.to_timm(synthetic_state_dict(TIMM_WIDE), TIMM_WIDE), _safetensors),
        "timm (--config)": (layouts.to_timm(hf, TINY), _timm_with_config),
    }


READERS = _readers()


@covers("C13")
@pytest.mark.parametrize("reader", sorted(READERS))
def test_each_required_tensor_deleted_is_a_one_line_input_error(reader, tmp_path):
    full, write = READERS[reader]

    def plan(path: Path):
        given = path.parent / "given" / "config.json"
        return plan_conversion(str(path), config_file=str(given) if given.is_file() else None)

    plan(write(full, tmp_path))  # the complete checkpoint converts
    wrong = []
    for key in sorted(full):
        folder = tmp_path / key.replace("/", "_")
        folder.mkdir()
        path = write({k: v for k, v in full.items() if k != key}, folder)
        try:
            plan(path)
        except SiglipScratchError as exc:
            message = str(exc)
            leaf = key.rsplit("/", 2)[-2:] if "/" in key else [key]
            if "\n" in message or ("/".join(leaf) not in message and key not in message):
                wrong.append(f"{key}: {message!r} (multi-line or does not name the key)")
        except Exception as exc:  # the defect: anything but our typed error
            wrong.append(f"{key}: {type(exc).__name__}: {exc}")
        else:
            wrong.append(f"{key}: converted without it")
    assert not wrong, f"{reader}: {len(wrong)}/{len(full)} deletions mishandled:\n" + "\n".join(wrong[:10])


def test_cli_npz_without_the_stem_kernel_exits_2_in_one_line(tmp_path, capsys):
    """The fuzz find from the newcomer issue: no ``img/embedding/kernel`` was ``internal error … KeyError``, exit 3."""
    arrays = dict(READERS["big_vision"][0])
    del arrays["img/embedding/kernel"]
    path = _npz(arrays, tmp_path)
    code = cli.main([str(path), str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}, stderr: {err!r}"
    assert err.count("\n") == 1 and err.startswith("error: ") and "embedding/kernel" in err, err
    assert not (tmp_path / "out").exists(), "a failed conversion left OUTPUT_DIR behind"
