"""Writing the output folder: atomically, streaming, hashed as written.

Everything goes into a temporary folder beside OUTPUT_DIR (``.<name>.siglip-convert-tmp-<pid>-<token>``)
and is renamed into place at the end, so the output appears complete or not at all. A lock file
(``.<name>.siglip-convert.lock``) keeps two converters off the same output. A temporary folder left
by a killed run is recognised by its name and dead pid and removed by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from siglip_scratch.checkpoint import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS, safetensors_prefix, tensor_bytes
from siglip_scratch.errors import CheckpointError, InputError, OutputError

from .sources import Planned
from .stores import read_chunks

__all__ = ["OutputFolder", "WrittenFile", "parse_size", "write_safetensors"]

_TMP = re.compile(r"^\.(?P<name>.+)\.siglip-convert-tmp-(?P<pid>\d+)-[0-9a-f]+$")


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", text.upper())
    if not m:
        raise InputError(f"cannot read size {text!r}", "--max-shard-size", "use e.g. 5GB, 500MB or 2GiB")
    value, unit = float(m.group(1)), (m.group(2) or "B")
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]] if unit != "B" else 0
    size = int(value * base**power)
    if size < 1:
        raise InputError(f"size {text!r} is not positive", "--max-shard-size", None)
    return size


# Outputs this process has renamed into place: an interrupt after that must not say "nothing was written".
COMMITTED: set[Path] = set()
_OLD = re.compile(r"^\.(?P<name>.+)\.siglip-convert-old-[0-9a-f]+$")
_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputFolder:
    """Context manager: a temporary folder that becomes ``target`` on success, vanishes on failure."""

    def __init__(self, target: Path, *, force: bool):
        self.target = target.resolve() if target.exists() else target.absolute()
        self.force = force
        self.parent = self.target.parent
        self.lock = self.parent / f".{self.target.name}.siglip-convert.lock"
        self.tmp = self.parent / f".{self.target.name}.siglip-convert-tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self._locked = False

    def check(self) -> None:
        """Refuse early (before any work) what cannot succeed."""
        if not self.parent.is_dir():
            raise OutputError("the output's parent folder does not exist", str(self.parent), "create it first")
        if self.target.exists() and not self.target.is_dir():
            raise OutputError("output path exists and is not a folder", str(self.target), "pick another path")
        if self.target.is_dir() and any(self.target.iterdir()) and not self.force:
            raise OutputError("output folder exists and is not empty", str(self.target), "pass --force to replace it")
        if not os.access(self.parent, os.W_OK | os.X_OK):
            raise OutputError("cannot write to the output's parent folder", str(self.parent), "check permissions")
        # os.access says yes for root on /proc or a read-only mount: create (and remove) a file to know.
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{self.target.name}.siglip-convert-probe-", dir=self.parent)
        except OSError as exc:
            raise OutputError(
                f"cannot create files in the output's parent folder ({exc.strerror})",
                str(self.parent),
                "pick an output folder on a writable disk",
            ) from None
        os.close(fd)
        os.unlink(probe)

    def __enter__(self) -> Path:
        self.check()
        self._acquire()
        try:
            self._clean_stale()
            self.tmp.mkdir()
        except BaseException:
            self._release()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._release()

    def _acquire(self) -> None:
        """An flock on the lock file: the kernel drops it when its holder exits, however it dies, so a
        lock is never stale and a reused pid cannot hold it. The pid written inside is for the message.
        The inode is checked after locking: a holder that unlinked the file on release (under the lock)
        leaves us holding a dead inode, so we retry on the new one."""
        while True:
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as exc:
                raise OutputError(
                    f"cannot create the output lock ({exc.strerror})", str(self.lock), "check permissions"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(
                    f"another siglip-convert (pid {holder}) is writing this output",
                    str(self.target),
                    "wait for it to finish, or pick another output folder (the lock goes when that process ends)",
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._lock_fd = fd
            self._locked = True
            return

    def _release(self) -> None:
        if self._locked:
            with contextlib.suppress(FileNotFoundError):
                self.lock.unlink()  # while still holding the flock (see _acquire's inode check)
            os.close(self._lock_fd)  # releases the flock
            self._locked = False

    def _clean_stale(self) -> None:
        """Leftovers of killed runs (we hold the lock, so none is in use): temp folders, and an old output
        moved aside by a --force replacement that died between its two renames, put back if the output
        itself is gone, else removed."""
        for entry in self.parent.iterdir():
            m = _TMP.match(entry.name)
            if m and m["name"] == self.target.name and not _pid_alive(int(m["pid"])):
                shutil.rmtree(entry, ignore_errors=True)
            old = _OLD.match(entry.name)
            if old and old["name"] == self.target.name:
                if not self.target.exists():
                    os.rename(entry, self.target)
                else:
                    shutil.rmtree(entry, ignore_errors=True)

    def _commit(self) -> None:
        _fsync_dir(self.tmp)
        if self.target.exists():
            if any(self.target.iterdir()):
                if not self.force:  # appeared while we worked
                    raise OutputError("output folder appeared while converting", str(self.target), "use --force")
                if _exchange(self.tmp, self.target):
                    # One atomic step: the old output now sits at the temp name, removed below (or,
                    # if we are killed first, by the next run's stale-temp cleanup).
                    shutil.rmtree(self.tmp, ignore_errors=True)
                else:  # no renameat2 here: two renames, and _clean_stale recovers a kill between them
                    trash = self.parent / f".{self.target.name}.siglip-convert-old-{secrets.token_hex(4)}"
                    os.rename(self.target, trash)
                    os.rename(self.tmp, self.target)
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.tmp, self.target)  # replaces the empty folder
        else:
            os.rename(self.tmp, self.target)
        COMMITTED.add(self.target)
        _fsync_dir(self.parent)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class WrittenFile:
    name: str
    sha256: str
    bytes: int


_NP_FLOAT = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def _finite_bytes(chunk: memoryview | bytes, tag: str) -> bool:
    if tag == "BF16":
        bits = np.frombuffer(chunk, np.uint16)
        return not bool(((bits & 0x7F80) == 0x7F80).any())  # exponent all ones: Inf or NaN
    if tag not in _NP_FLOAT:
        return True
    values = np.frombuffer(chunk, _NP_FLOAT[tag])
    # A sum is NaN/Inf if any element is; an overflowing sum of finite values is re-checked exactly.
    total = np.add.reduce(values, dtype=np.float64)
    return bool(np.isfinite(total) or np.isfinite(values).all())


def write_safetensors(
    path: Path,
    items: Sequence[tuple[Planned, torch.dtype]],
    metadata: dict[str, str],
    *,
    allow_nonfinite: bool,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> WrittenFile:
    """Stream the planned tensors into one safetensors file.

    A tensor whose output dtype equals its source dtype and that needs no transform is copied as
    raw bytes from the source file (bit-identical by construction); others are built, cast, and
    written. Every tensor is checked for NaN/Inf unless ``allow_nonfinite``.
    """
    header: dict[str, object] = {}
    offset = 0
    for p, dtype in items:
        tag = TORCH_TO_SAFETENSORS[dtype]
        n = int(np.prod(p.shape, dtype=np.int64)) * SAFETENSORS_DTYPES[tag][1]
        header[p.key] = {"dtype": tag, "shape": list(p.shape), "data_offsets": [offset, offset + n]}
        offset += n
    # The data starts on a 64-byte boundary whatever the header's length (which names the source path): see
    # DATA_ALIGNMENT.
    prefix = safetensors_prefix(header, metadata)
    digest = hashlib.sha256()
    with open(path, "wb") as fh:

        def emit(data: memoryview | bytes) -> None:
            fh.write(data)
            digest.update(data)
            on_bytes(len(data))

        emit(prefix)
        for p, dtype in items:
            tag = TORCH_TO_SAFETENSORS[dtype]
            for chunk in _tensor_chunks(p, dtype):
                if not allow_nonfinite and not _finite_bytes(chunk, tag):
                    raise CheckpointError(
                        "tensor has NaN or Inf values",
                        f"{p.where} -> {p.key}",
                        "fix the checkpoint, or pass --allow-nonfinite to keep them",
                    )
                emit(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return WrittenFile(path.name, digest.hexdigest(), len(prefix) + offset)


def _tensor_chunks(p: Planned, dtype: torch.dtype) -> Iterator[memoryview | bytes]:
    if p.raw is not None and p.raw.torch_dtype == dtype:
        yield from read_chunks(p.raw)
        return
    t = p.make()
    if tuple(t.shape) != p.shape:
        raise CheckpointError(f"built shape {list(t.shape)} vs planned {list(p.shape)}", p.where, "report this")
    if t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    yield tensor_bytes(t)


def write_json(path: Path, data: object) -> WrittenFile:
    text = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    path.write_bytes(text)
    return WrittenFile(path.name, hashlib.sha256(text).hexdigest(), len(text))


def disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
