"""Reading checkpoints: validated safetensors headers, sharded indexes, key layouts, strict checks.

Nothing here trusts a file: a safetensors header is parsed and checked (length, JSON, dtypes,
shapes against byte lengths, offsets in range and not overlapping) before any tensor is read, and
every failure is a `CheckpointError`/`SourceError` that names the file and the key.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, SourceError
from .files import read_json

__all__ = [
    "DATA_ALIGNMENT",
    "SAFETENSORS_DTYPES",
    "TensorInfo",
    "check_state_shapes",
    "index_checkpoint",
    "load_tensors",
    "map_vision_keys",
    "read_safetensors_header",
    "safetensors_prefix",
    "save_safetensors",
    "tensor_bytes",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype tag -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
TORCH_TO_SAFETENSORS = {dt: tag for tag, (dt, _) in SAFETENSORS_DTYPES.items()}

# Where tensor data starts in the files we write. The format pads the header with spaces; safetensors' own writer
# pads to 8 bytes, so the data's place moves with the header's length (the keys, the shapes, a source path in the
# metadata). Loaded zero-copy (mmap; transformers does the same), a weight off a 16-byte boundary takes another MKL
# matrix-vector path, and the batch-1 MAP head of a reloaded model differed by an ulp from the model that was saved.
# At 64 bytes the tensors sit where freshly allocated ones would.
DATA_ALIGNMENT = 64


def safetensors_prefix(entries: Mapping[str, object], metadata: Mapping[str, str] | None) -> bytes:
    """A safetensors file's first bytes: the header's length (8 bytes, little-endian) and the header (``entries``
    plus ``__metadata__`` unless None), padded with spaces so the data that follows starts at a multiple of
    `DATA_ALIGNMENT`."""
    header = {**entries} if metadata is None else {**entries, "__metadata__": dict(metadata)}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % DATA_ALIGNMENT)
    return len(blob).to_bytes(8, "little") + blob


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in memory order (moved to the CPU first), without a copy when it is already a contiguous CPU
    tensor."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` as one safetensors file, the data aligned as the converter's writer aligns it."""
    entries: dict[str, object] = {}
    offset = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        entries[key] = {
            "dtype": TORCH_TO_SAFETENSORS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    with open(path, "wb") as fh:
        fh.write(safetensors_prefix(entries, metadata))
        for t in tensors.values():
            fh.write(tensor_bytes(t))


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file and absolute byte range [start, end)."""

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"duplicate key {k!r} in the safetensors header", None, None)
        out[k] = v
    return out


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading any tensor data.

    Returns:
        (tensors by key, the ``__metadata__`` dict).
    Raises:
        SourceError: the file is missing or unreadable.
        CheckpointError: the header is malformed; the message names the file and the key.
    """
    file = Path(path)
    where = str(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"file is {size} bytes, too short for a safetensors header", where, "re-download or re-export it"
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit", where, "the file is corrupt"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"header length {n} runs past the end of the {size}-byte file",
                    where,
                    "the file is truncated or not safetensors; re-download it",
                )
            raw = fh.read(n)
    except FileNotFoundError:
        raise SourceError("weights file not found", where, "check the path") from None
    except IsADirectoryError:
        raise SourceError("expected a .safetensors file, got a folder", where, None) from None
    except PermissionError:
        raise SourceError("weights file is not readable", where, "check its permissions") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except CheckpointError as exc:
        raise CheckpointError(exc.what, where, "the file is corrupt") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"header is not valid JSON ({exc})", where, "the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object", where, "the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError("__metadata__ must map strings to strings", where, "the file is corrupt")
    data_start, data_len = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        tensors[key] = _tensor_info(file, key, entry, data_start, data_len)
    spans = sorted((t.start, t.end, t.key) for t in tensors.values() if t.end > t.start)
    for (_, end_a, key_a), (start_b, _, key_b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise CheckpointError(f"tensors {key_a!r} and {key_b!r} overlap", where, "the file is corrupt")
    return tensors, metadata


def _tensor_info(file: Path, key: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    where = f"{file}: {key}"
    if not isinstance(entry, dict):
        raise CheckpointError("tensor entry is not a JSON object", where, "the file is corrupt")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}", where, None)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"invalid shape {shape!r}", where, "the file is corrupt")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"invalid data_offsets {offsets!r}", where, "the file is corrupt")
    if offsets[1] > data_len:
        raise CheckpointError(
            f"data_offsets {offsets} run past the {data_len} data bytes",
            where,
            "the file is truncated; re-download it",
        )
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{dtype} shape {shape} needs {expected} bytes but data_offsets span {offsets[1] - offsets[0]}",
            where,
            "the file is corrupt",
        )
    return TensorInfo(file, key, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"


def read_index(index_file: Path) -> dict[str, Path]:
    """``weight_map`` of a sharded checkpoint index: key -> shard path (shards not opened)."""
    where = str(index_file)
    data = read_json(index_file, what="index", error=CheckpointError, fix="re-download it")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError("index has no weight_map of key -> shard file", where, "re-download it")
    out: dict[str, Path] = {}
    for key, shard in weight_map.items():
        if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise CheckpointError(f"shard name {shard!r} is not a plain file name", f"{where}: {key}", None)
        out[key] = index_file.parent / shard
    return out


def folder_safetensors(folder: Path) -> Path | None:
    """The safetensors weights of a model folder, by the one rule both the loader and the converter use
    (transformers' own order): ``model.safetensors``, else its index, else the folder's only
    ``.safetensors`` file; None when there is none."""
    for name in (WEIGHTS_NAME, INDEX_NAME):
        if (folder / name).is_file():
            return folder / name
    singles = sorted(folder.glob("*.safetensors"))
    return singles[0] if len(singles) == 1 else None


def index_checkpoint(
    path: str | os.PathLike[str], *, vision_only: bool = False, also: Callable[[str], bool] | None = None
) -> dict[str, TensorInfo]:
    """The tensors of a checkpoint: a ``.safetensors`` file, or a folder with ``model.safetensors`` or
    a sharded ``model.safetensors.index.json``.

    Args:
        path: the file or folder.
        vision_only: for a sharded checkpoint, list only keys that are not dropped by `PREFIX_RULES`
            and open only their shards (a text-tower or language-model shard is never read and
            need not be on disk). ``also``: keys kept beside the vision ones (a VLM's projector).
    """
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _index_sharded(path, vision_only, also)
        return read_safetensors_header(path)[0]
    if not path.is_dir():
        raise SourceError("no such file or folder", str(path), "check the path")
    found = folder_safetensors(path)
    if found is not None:
        return (
            _index_sharded(found, vision_only, also) if found.name == INDEX_NAME else read_safetensors_header(found)[0]
        )
    raise SourceError(
        f"no {WEIGHTS_NAME} or {INDEX_NAME} found",
        str(path),
        "convert the checkpoint with siglip-convert first",
    )


def _index_sharded(index_file: Path, vision_only: bool, also: Callable[[str], bool] | None) -> dict[str, TensorInfo]:
    weight_map = read_index(index_file)
    wanted = set(weight_map)
    if vision_only:
        _, dropped, _ = map_vision_keys(weight_map)
        wanted -= {k for k in dropped if also is None or not also(k)}
    shards = sorted({weight_map[k] for k in wanted})
    out: dict[str, TensorInfo] = {}
    for shard in shards:
        tensors, _ = read_safetensors_header(shard)
        for key, shard_of_key in weight_map.items():
            if shard_of_key != shard or key not in wanted:
                continue
            if key not in tensors:
                raise CheckpointError(
                    f"the index puts {key!r} in {shard.name} but that shard does not hold it",
                    str(index_file),
                    "re-download the checkpoint",
                )
            out[key] = tensors[key]
    return out


def load_tensors(infos: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """The given tensors (validated headers), keyed like ``infos``, without copying them.

    Each file is mapped copy-on-write (``mmap.ACCESS_COPY``): tensors are views of the page cache,
    so loading costs no copy and the memory stays file-backed, and writing to a tensor changes
    private pages, never the file. (Replacing a file in place while a model uses it is unsafe, as
    with any mmap; the converter always writes a new file and renames it.)
    """
    by_file: dict[Path, list[tuple[str, TensorInfo]]] = {}
    for name, info in infos.items():
        by_file.setdefault(info.file, []).append((name, info))
    out: dict[str, torch.Tensor] = {}
    for file, items in by_file.items():
        try:
            with open(file, "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if os.fstat(fh.fileno()).st_size else None
        except OSError as exc:
            raise SourceError(f"cannot map the file ({exc.strerror})", str(file), None) from None
        for name, info in items:
            dtype, itemsize = SAFETENSORS_DTYPES[info.dtype]
            count = info.nbytes // itemsize
            if count == 0 or mapped is None:
                out[name] = torch.empty(info.shape, dtype=dtype)
            elif info.start % itemsize == 0:
                out[name] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=info.start).view(info.shape)
            else:  # misaligned for its dtype (allowed by the format, never written by safetensors): copy
                raw = bytearray(mapped[info.start : info.end])
                out[name] = torch.frombuffer(raw, dtype=dtype).view(info.shape)
    return out


# -- key layouts ------------------------------------------------------------------------------
# Source prefix -> canonical prefix, or None to drop the tensor. The longest matching prefix wins;
# a key that matches nothing is "unexpected". Flat SiglipVisionModel keys (what transformers >= 5.6
# writes for a model built from scratch) start with one of the tower's four top-level modules.
PREFIX_RULES: tuple[tuple[str, str | None], ...] = (
    # hub SiglipVisionModel / full SiglipModel
    ("vision_model.", "vision_model."),
    ("text_model.", None),
    ("logit_scale", None),
    ("logit_bias", None),
    # flat SiglipVisionModel (transformers >= 5.6)
    ("embeddings.", "vision_model.embeddings."),
    ("encoder.", "vision_model.encoder."),
    ("post_layernorm.", "vision_model.post_layernorm."),
    ("head.", "vision_model.head."),
    # VLMs with a SigLIP tower (PaliGemma 1/2, Gemma 3, LLaVA, LLaVA-NeXT, LLaVA-OneVision), on disk:
    # transformers 4.x and the hub wrap the tower (vision_tower.vision_model.…), 5.x writes it flat
    # (vision_tower.embeddings.…); the language model is language_model.… in both.
    ("vision_tower.vision_model.", "vision_model."),
    ("vision_tower.", "vision_model."),
    ("language_model.", None),
    ("multi_modal_projector.", None),
    ("image_newline", None),  # LLaVA-NeXT / OneVision: a learned separator, outside the tower
    # the same models in memory under transformers 5.x (state_dict(): model.…)
    ("model.vision_tower.vision_model.", "vision_model."),
    ("model.vision_tower.", "vision_model."),
    ("model.language_model.", None),
    ("model.multi_modal_projector.", None),
    ("model.image_newline", None),
    ("lm_head.", None),
    # SmolVLM / Idefics3: the same tower without a head (bucketed position ids, see the converter note)
    ("model.vision_model.", "vision_model."),
    ("model.text_model.", None),
    ("model.connector.", None),
)


# The order rules are tried in: the longest prefix first (vision_tower.vision_model. before vision_tower.).
PREFIX_RULES_LONGEST_FIRST = tuple(sorted(PREFIX_RULES, key=lambda r: -len(r[0])))

# Floating dtypes by the names the CLIs and the Python API take.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def map_vision_keys(keys: Iterable[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """Map checkpoint keys to canonical ``vision_model.…`` keys by `PREFIX_RULES`.

    Returns:
        (canonical key -> source key, dropped source keys, unmatched source keys), lists sorted.
    """
    mapping: dict[str, str] = {}
    dropped: list[str] = []
    unmatched: list[str] = []
    rules = PREFIX_RULES_LONGEST_FIRST
    for key in keys:
        for prefix, target in rules:
            if key == prefix or key.startswith(prefix):
                if target is None:
                    dropped.append(key)
                else:
                    canonical = target + key[len(prefix) :]
                    if canonical in mapping:
                        raise CheckpointError(
                            f"keys {mapping[canonical]!r} and {key!r} both map to {canonical!r}",
                            key,
                            "the checkpoint mixes two layouts; keep one",
                        )
                    mapping[canonical] = key
                break
        else:
            unmatched.append(key)
    return mapping, sorted(dropped), sorted(unmatched)


def foreign_layout(keys: Iterable[str]) -> str | None:
    """The name of a known non-hub SigLIP layout these keys are in (which siglip-convert reads), or None."""
    keys = list(keys)
    if any(k.endswith("patch_embed.proj.weight") for k in keys):
        return "open_clip SigLIP" if any(k.startswith("visual.trunk.") for k in keys) else "timm SigLIP"
    if any("Transformer/encoderblock" in k for k in keys):
        return "big_vision"
    return None


def _short(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_shapes(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    source: str,
) -> None:
    """Raise `CheckpointError` unless ``found`` has exactly the keys and shapes of ``expected``.

    The error carries the full sorted lists as ``missing``, ``unexpected`` and ``mismatched``.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        (k, tuple(expected[k]), tuple(found[k]))
        for k in set(expected) & set(found)
        if tuple(expected[k]) != tuple(found[k])
    )
    if not (missing or unexpected or mismatched):
        return
    other = foreign_layout(found)
    if "vision_model.embeddings.patch_embedding.weight" not in found and other:
        err = CheckpointError(
            f"this is a {other} checkpoint, not the hub layout ({other} layout detected)",
            source,
            "convert it with `siglip-convert SOURCE OUTPUT_DIR` and load OUTPUT_DIR",
        )
    elif "vision_model.embeddings.patch_embedding.weight" not in found:
        err = CheckpointError(
            "no SigLIP vision tower in this checkpoint",
            source,
            "pass a SigLIP/PaliGemma checkpoint that holds the vision tower (keys like "
            "vision_model.embeddings.patch_embedding.weight)",
        )
    else:
        parts = []
        if mismatched:
            k, want, got = mismatched[0]
            parts.append(f"{len(mismatched)} wrong shape(s), first {k}: checkpoint {list(got)} vs model {list(want)}")
        if missing:
            parts.append(f"missing {len(missing)}: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
        err = CheckpointError(
            "checkpoint does not fit the config; " + "; ".join(parts),
            source,
            "check that config.json belongs to these weights (or pass the right --config/preset)",
        )
    err.missing, err.unexpected, err.mismatched = missing, unexpected, mismatched
    raise err
