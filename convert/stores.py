"""Tensor stores: every checkpoint format behind one read-only interface.

A store lists keys with shapes and dtypes *without reading tensor data*, loads one tensor at a
time, and, for safetensors, hands out the raw byte range so a tensor that needs no change can be
copied byte for byte. Only the tensors the converter asks for are ever read.
"""

from __future__ import annotations

import abc
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from siglip_scratch.checkpoint import (
    TensorInfo,
    index_checkpoint,
    map_vision_keys,
    read_index,
)
from siglip_scratch.errors import CheckpointError, SourceError

__all__ = ["NpzStore", "SafetensorsStore", "Store", "TorchPickleStore"]


class Store(abc.ABC):
    """Keys, shapes and dtypes up front; tensors on demand. One subclass per file format."""

    files: list[Path]

    @abc.abstractmethod
    def keys(self) -> list[str]: ...

    @abc.abstractmethod
    def shape(self, key: str) -> tuple[int, ...]: ...

    @abc.abstractmethod
    def dtype(self, key: str) -> torch.dtype: ...

    @abc.abstractmethod
    def load(self, key: str) -> torch.Tensor: ...

    def raw(self, key: str) -> TensorInfo | None:
        """The byte range of an unmodified tensor, when the format allows a plain copy."""
        return None

    def where(self, key: str) -> str:
        return f"{self.files[0]}: {key}" if len(self.files) == 1 else key

    def _missing(self, key: str) -> CheckpointError:
        """The one error for a key a reader needs and the file lacks (never a bare KeyError)."""
        where = str(self.files[0]) if len(self.files) == 1 else f"{len(self.files)} files from {self.files[0].parent}"
        return CheckpointError(
            f"required tensor {key!r} is missing", where, "the checkpoint is incomplete or not this layout"
        )


class SafetensorsStore(Store):
    """A ``.safetensors`` file, or a folder/index of shards. Headers are validated before use."""

    def __init__(self, path: Path, *, vision_only: bool = True, also: Callable[[str], bool] | None = None):
        self.infos = index_checkpoint(path, vision_only=vision_only, also=also)
        self.files = sorted({i.file for i in self.infos.values()})

    def keys(self) -> list[str]:
        return list(self.infos)

    def _info(self, key: str) -> TensorInfo:
        if key not in self.infos:
            raise self._missing(key)
        return self.infos[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self._info(key).torch_dtype

    def raw(self, key: str) -> TensorInfo:
        return self._info(key)

    def where(self, key: str) -> str:
        return f"{self._info(key).file}: {key}"

    def load(self, key: str) -> torch.Tensor:
        info = self._info(key)
        buf = bytearray(info.nbytes)
        with open(info.file, "rb") as fh:
            fh.seek(info.start)
            if fh.readinto(buf) != info.nbytes:
                raise CheckpointError("file ended inside the tensor", self.where(key), "re-download the file")
        if not buf:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(info.shape)


def read_chunks(info: TensorInfo, chunk: int = 16 << 20) -> Iterator[memoryview]:
    """The raw bytes of a tensor in chunks (one reused buffer)."""
    buf = bytearray(min(chunk, max(info.nbytes, 1)))
    view = memoryview(buf)
    with open(info.file, "rb") as fh:
        fh.seek(info.start)
        left = info.nbytes
        while left:
            n = fh.readinto(view[: min(left, len(buf))])
            if not n:
                raise CheckpointError("file ended inside the tensor", f"{info.file}: {info.key}", "re-download it")
            yield view[:n]
            left -= n


class TorchPickleStore(Store):
    """``pytorch_model.bin`` / ``.pt`` / ``.pth`` (or a sharded ``.bin`` index), read with
    ``torch.load(weights_only=True)``: no code in the file is ever executed."""

    def __init__(self, path: Path):
        if path.name.endswith(".index.json"):
            # Like the safetensors index: only shards that hold something of the vision tower are opened
            # (the hub fetch downloads only those; a language-model shard need not be on disk).
            weight_map = read_index(path)
            _, dropped, _ = map_vision_keys(weight_map)
            shards = sorted({weight_map[k] for k in set(weight_map) - set(dropped)})
        else:
            shards = [path]
        self.files = shards
        self.tensors: dict[str, torch.Tensor] = {}
        self.origin: dict[str, Path] = {}
        self.notes: list[str] = []  # wrappers taken off (training checkpoints), for the detection lines
        for shard in shards:
            tensors, notes = _torch_load(shard)
            self.notes += [n for n in notes if n not in self.notes]
            for key, t in tensors.items():
                if key in self.tensors:
                    raise CheckpointError(f"key {key!r} appears in two shards", str(shard), "the index is corrupt")
                self.tensors[key] = t
                self.origin[key] = shard

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.load(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.load(key).dtype

    def load(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise self._missing(key)
        return self.tensors[key]

    def where(self, key: str) -> str:
        self.load(key)
        return f"{self.origin[key]}: {key}"


# Training checkpoints keep the weights under one of these keys, next to epoch/optimizer/scaler state.
STATE_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")
DDP_PREFIX = "module."


def _unwrap(obj: object) -> tuple[object, list[str]]:
    """A training checkpoint's state dict: ``{"state_dict": …}`` and the like, then a DistributedDataParallel
    ``module.`` prefix on every key. Returns the state dict and what was taken off."""
    notes = []
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in STATE_WRAPPERS if isinstance(obj.get(k), dict)), None)
        if key is not None:
            others = sorted(str(k) for k in obj if k != key)
            notes.append(
                f"training checkpoint: weights taken from {key!r}"
                + (f" (ignored: {', '.join(others)})" if others else "")
            )
            obj = obj[key]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith(DDP_PREFIX) for k in obj):
        obj = {k[len(DDP_PREFIX) :]: v for k, v in obj.items()}
        notes.append("DistributedDataParallel 'module.' prefix removed from every key")
    return obj, notes


def _torch_load(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    where = str(path)
    if not path.is_file():
        raise SourceError("weights file not found", where, "check the path")
    if path.stat().st_size == 0:
        raise CheckpointError("weights file is empty", where, "re-download it")
    is_zip = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except RuntimeError as exc:
        raise CheckpointError(
            f"not a readable PyTorch checkpoint ({str(exc).splitlines()[0]})", where, "re-download or re-export it"
        ) from None
    except Exception as exc:  # torch.load raises UnpicklingError, EOFError, ValueError, ... on bad files
        name = type(exc).__name__
        if "Unpickling" in name or "weights_only" in str(exc):
            raise CheckpointError(
                "refused: the pickle wants to run code or load non-tensor objects (read with weights_only=True)",
                where,
                "get a safetensors export of these weights; never load untrusted pickles without weights_only",
            ) from None
        raise CheckpointError(f"not a readable PyTorch checkpoint ({name}: {exc})", where, "re-download it") from None
    obj, notes = _unwrap(obj)
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError("checkpoint is not a state dict of named tensors", where, None)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(obj):
        bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))[:5]
        raise CheckpointError(f"non-tensor entries in the state dict: {bad}", where, None)
    return tensors, notes


# -- big_vision .npz --------------------------------------------------------------------------------
_SCANNED = re.compile(r"^(?P<pre>.*Transformer/)encoderblock/(?P<rest>.+)$")
_NPZ_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float64): torch.float64,
}


class NpzStore(Store):
    """A big_vision ``.npz``. Keys are ``/``-separated parameter paths as saved.

    A *scanned* checkpoint (``Transformer/encoderblock/…`` with the layer axis first) is exposed
    under per-block keys ``Transformer/encoderblock_{i}/…`` so one table serves both layouts.
    bfloat16 arrays, which numpy stores as 2-byte void (``V2``), come back as torch.bfloat16.
    """

    def __init__(self, path: Path):
        self.files = [path]
        where = str(path)
        if not path.is_file():
            raise SourceError("npz file not found", where, "check the path")
        if not zipfile.is_zipfile(path):
            raise CheckpointError("not an .npz file (not a zip archive)", where, "re-download or re-export it")
        try:
            self.npz = np.load(path, allow_pickle=False, mmap_mode=None)
            self._headers = {name: _npy_header(self.npz, name, where) for name in self.npz.files}
        except CheckpointError:
            raise
        except Exception as exc:  # zipfile/zlib/numpy raise many types on a damaged archive
            raise CheckpointError(
                f"corrupt .npz ({type(exc).__name__}: {exc})", where, "re-download or re-export it"
            ) from None
        # virtual key -> (stored key, layer index or None)
        self.index: dict[str, tuple[str, int | None]] = {}
        for name, (shape, _) in self._headers.items():
            m = _SCANNED.match(name)
            if m and shape:
                for i in range(shape[0]):
                    self.index[f"{m['pre']}encoderblock_{i}/{m['rest']}"] = (name, i)
            else:
                self.index[name] = (name, None)

    def keys(self) -> list[str]:
        return list(self.index)

    def _stored(self, key: str) -> tuple[str, int | None]:
        if key not in self.index:
            raise self._missing(key)
        return self.index[key]

    def shape(self, key: str) -> tuple[int, ...]:
        name, i = self._stored(key)
        shape = self._headers[name][0]
        return shape[1:] if i is not None else shape

    def dtype(self, key: str) -> torch.dtype:
        return self._headers[self._stored(key)[0]][1]

    def load(self, key: str) -> torch.Tensor:
        name, i = self._stored(key)
        where = f"{self.files[0]}: {name}"
        try:
            arr = self.npz[name]
        except Exception as exc:  # zipfile/zlib/numpy raise many types on a damaged archive
            raise CheckpointError(
                f"cannot read array ({type(exc).__name__}: {exc})", where, "the file is corrupt"
            ) from None
        if i is not None:
            arr = arr[i]
        if arr.dtype.kind == "V":
            # bfloat16 saved by JAX: 2-byte void; reinterpret the bits.
            t = torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16).astype(np.int16, copy=False))
            return t.view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(arr))

    def where(self, key: str) -> str:
        return f"{self.files[0]}: {self._stored(key)[0]}"


def _npy_header(npz: np.lib.npyio.NpzFile, name: str, where: str) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of one member from its .npy header, without reading the array."""
    member = name + ".npy"
    with npz.zip.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    if dtype.kind == "V":
        if dtype.itemsize != 2:
            raise CheckpointError(
                f"array of raw {dtype.itemsize}-byte items where bfloat16 needs 2",
                f"{where}: {name}",
                "re-export it; bfloat16 arrays must be 2 bytes per item",
            )
        return tuple(shape), torch.bfloat16
    if dtype not in _NPZ_DTYPES:
        raise CheckpointError(f"unsupported array dtype {dtype}", f"{where}: {name}", "use float32/16 or bfloat16")
    return tuple(shape), _NPZ_DTYPES[dtype]
