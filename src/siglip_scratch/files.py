"""Reading small files the one way: JSON with typed one-line errors, and sha256 of large files."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any

from .errors import SiglipScratchError, SourceError

__all__ = ["is_sha256", "read_json", "sha256_file"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(text: str) -> bool:
    """A lowercase hex sha256 digest (what the hub names LFS blobs and reports as an ETag)."""
    return _SHA256.fullmatch(text) is not None


def read_json(
    path: Path,
    *,
    what: str,
    error: type[SiglipScratchError],
    fix: str = "fix or re-download it",
    missing_fix: str | None = None,
) -> Any:
    """Parse a JSON file. A missing file is a `SourceError`; unreadable or invalid JSON is ``error``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceError(f"no {what} found", str(path), missing_fix or "check the path") from None
    except IsADirectoryError:
        raise SourceError(f"expected a {what} file, got a folder", str(path), None) from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text ({exc.reason})", str(path), fix) from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON ({exc})", str(path), fix) from None


def sha256_file(path: Path, chunk: int = 16 << 20, stop: threading.Event | None = None) -> str:
    """sha256 of a file read in chunks; returns early (with a meaningless digest) once ``stop`` is set."""
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while (n := fh.readinto(buf)) and not (stop is not None and stop.is_set()):
            digest.update(view[:n])
    return digest.hexdigest()
