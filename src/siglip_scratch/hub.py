"""Fetching checkpoints through huggingface_hub: only the files the vision tower needs, verified.

The real hub client does the work (revisions, the cache under ``HF_HOME``/``HF_HUB_CACHE``,
``HF_TOKEN``, ``HF_HUB_OFFLINE=1``, ``HF_ENDPOINT``); this module decides *which* files, retries
transient failures (5xx, dropped connections, short bodies, timeouts) with backoff, checks every
freshly downloaded file against the hub's sha256 (retried once, then an error), and turns the
client's exceptions into one-line `SourceError`s that say what to do.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .checkpoint import INDEX_NAME, WEIGHTS_NAME, map_vision_keys, read_index
from .errors import SourceError
from .files import is_sha256, sha256_file

__all__ = ["RETRIES", "download_vision_checkpoint", "hub_file"]

PREPROCESSOR_NAME = "preprocessor_config.json"
BIN_INDEX_NAME, BIN_WEIGHTS_NAME = "pytorch_model.bin.index.json", "pytorch_model.bin"
RETRIES = 2  # extra attempts for transient failures (the hub client retries HEAD 5xx itself too)
BACKOFF_S = float(os.environ.get("SIGLIP_HUB_BACKOFF_S", "0.5"))  # 0.5 s, 1 s, 2 s, ...


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Network failures worth retrying, across huggingface_hub 0.x (requests) and 1.x+ (httpx)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests

        errors += [requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError]
    except ImportError:
        pass
    return tuple(errors)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _describe(exc: BaseException) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status:
        return f"HTTP {status}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]


def quiet_hub_logs() -> None:
    """Keep the hub client's retry warnings off stderr (CLIs print one line per failure)."""
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _forget(path: Path) -> None:
    """Remove a bad download from the cache (the blob and the snapshot link to it)."""
    blob = path.resolve()
    for p in (path, blob):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def hub_file(repo_id: str, filename: str, *, revision: str | None = None, optional: bool = False) -> Path | None:
    """Download one file (or take it from the cache). ``optional`` files that do not exist give None."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    where = f"{repo_id}@{revision or 'main'}: {filename}"
    transient = _transient_errors()
    cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    last: str = ""
    sha_failures = 0
    for attempt in range(RETRIES + 1):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            path = Path(hf_hub_download(repo_id, filename, revision=revision, force_download=sha_failures > 0))
        except hf_errors.GatedRepoError:
            raise SourceError(
                "the repo is gated and this request was not authorised",
                where,
                "accept its licence on the hub and set HF_TOKEN",
            ) from None
        except hf_errors.RepositoryNotFoundError:
            raise SourceError(
                "repo not found (or private)", where, "check the repo id; for a private repo set HF_TOKEN"
            ) from None
        except hf_errors.RevisionNotFoundError:
            raise SourceError("revision not found", where, "check --revision (a branch, tag or commit)") from None
        # LocalEntryNotFoundError subclasses EntryNotFoundError: it must come first. Offline it means
        # "not cached"; online, with a cause, the hub could not be reached (after the client's own
        # retries): a transient failure, not a missing file.
        except hf_errors.LocalEntryNotFoundError as exc:
            cause = exc.__cause__
            if cause is None or _offline():
                if optional:
                    return None
                raise SourceError(
                    "not in the local cache and the hub cannot be reached",
                    where,
                    "download it once with network access (or unset HF_HUB_OFFLINE), or pass a local folder",
                ) from None
            status = getattr(getattr(cause, "response", None), "status_code", None)
            if status is not None:
                # The client already retried this with its own backoff: report, do not multiply the wait.
                raise SourceError(
                    f"hub answered HTTP {status} after the hub client's retries", where, "retry later"
                ) from None
            last = f"hub unreachable ({_describe(cause)})"
            continue
        except hf_errors.EntryNotFoundError:
            if optional:
                return None
            raise SourceError("file not found in the repo", where, "check that this is a SigLIP checkpoint") from None
        except hf_errors.HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            last = f"hub answered HTTP {status}" if status else f"hub request failed ({str(exc).splitlines()[0]})"
            if status is not None and status < 500 and status != 429:
                raise SourceError(last, where, "check the repo id, revision and HF_TOKEN") from None
            continue
        except transient as exc:
            last = f"network error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            continue
        except OSError as exc:  # e.g. huggingface_hub's size consistency check on a short body
            if "Consistency check failed" in str(exc):
                last = f"incomplete download ({str(exc).splitlines()[0]})"
                continue
            raise SourceError(f"download failed: {exc}", where, "check the network and disk space") from None
        if isinstance(cached, str):
            return path  # was in the cache before this call: verified when it arrived
        expected = path.resolve().name
        if not is_sha256(expected):
            return path  # a small git-tracked file: the hub gives no sha256 for it
        actual = sha256_file(path)
        if actual == expected:
            return path
        _forget(path)
        sha_failures += 1
        last = f"downloaded bytes have sha256 {actual[:12]}… but the hub says {expected[:12]}…"
        if sha_failures > 1:
            raise SourceError(last + " (twice)", where, "the download is corrupted in transit; retry later")
    raise SourceError(f"{last}; gave up after {RETRIES + 1} attempts", where, "retry later or check HF_ENDPOINT")


def download_vision_checkpoint(repo_id: str, *, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """Fetch config, preprocessor config and the weight files that hold vision tensors.

    safetensors first: for a sharded repo the index is read and only the shards holding vision
    tensors are fetched. With ``allow_pickle``, a repo without safetensors falls back to
    ``pytorch_model.bin`` (or its index), which callers must read with ``weights_only=True``.
    Returns the snapshot folder (inside the hub cache).
    """
    config = hub_file(repo_id, "config.json", revision=revision)
    assert config is not None
    hub_file(repo_id, PREPROCESSOR_NAME, revision=revision, optional=True)
    candidates = [(INDEX_NAME, WEIGHTS_NAME)]
    if allow_pickle:
        candidates.append((BIN_INDEX_NAME, BIN_WEIGHTS_NAME))
    for index_name, single_name in candidates:
        index = hub_file(repo_id, index_name, revision=revision, optional=True)
        if index is not None:
            weight_map = read_index(index)
            mapping, _, _ = map_vision_keys(weight_map)
            for shard in sorted({weight_map[src].name for src in mapping.values()}):
                hub_file(repo_id, shard, revision=revision)
            return config.parent
        if hub_file(repo_id, single_name, revision=revision, optional=True) is not None:
            return config.parent
    raise SourceError(
        "no safetensors weights in the repo" + ("" if allow_pickle else " (pickle .bin files are not loaded here)"),
        f"{repo_id}@{revision or 'main'}",
        "convert it with siglip-convert, which reads .bin safely",
    )
