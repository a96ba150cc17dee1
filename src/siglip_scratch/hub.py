"""Fetching checkpoints through huggingface_hub: only the files the vision tower needs, verified.

The real hub client does the work (revisions, the cache under ``HF_HOME``/``HF_HUB_CACHE``,
``HF_TOKEN``, ``HF_HUB_OFFLINE=1``, ``HF_ENDPOINT``); this module decides *which* files, retries
transient failures (5xx, dropped connections, short bodies, timeouts) with backoff, checks every
freshly downloaded file against the hub's sha256 (retried once, then an error), and turns the
client's exceptions into one-line `SourceError`s that say what to do.
"""

from __future__ import annotations

import os
import re
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import INDEX_NAME, MAX_HEADER_BYTES, WEIGHTS_NAME, map_vision_keys, read_index
from .errors import CheckpointError, SourceError
from .files import is_sha256, sha256_file

__all__ = ["RETRIES", "RangedRead", "download_vision_checkpoint", "fetch_vision_ranges", "hub_file"]

PREPROCESSOR_NAME = "preprocessor_config.json"
BIN_INDEX_NAME, BIN_WEIGHTS_NAME = "pytorch_model.bin.index.json", "pytorch_model.bin"
RETRIES = 2  # extra attempts for transient failures (the hub client retries HEAD 5xx itself too)
BACKOFF_S = float(os.environ.get("SIGLIP_HUB_BACKOFF_S", "0.5"))  # 0.5 s, 1 s, 2 s, ...


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Network failures worth retrying, across huggingface_hub 0.x (requests), 1.x (httpx), 2.x (httpx2)."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx", "httpx2"):  # huggingface_hub 1.x uses httpx, 2.x its fork httpx2
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
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


def _backoff(attempt: int, last: str, where: str) -> None:
    """Wait before retry ``attempt`` (1-based), saying what failed and what happens next when a person
    is watching (stderr is a terminal); logs and CI keep the one-line error contract."""
    wait = BACKOFF_S * 2 ** (attempt - 1)
    if sys.stderr.isatty():
        print(
            f"hub: {last} ({where}); retry {attempt} of {RETRIES} in {wait:.1f} s "
            "(offline? set HF_HUB_OFFLINE=1 to use only the local cache)",
            file=sys.stderr,
            flush=True,
        )
    time.sleep(wait)


def quiet_hub_logs() -> None:
    """Keep the hub client's retry warnings off stderr when it is not a terminal (logs and CI get one
    line per failure); a person watching sees the client's own retries as they happen."""
    from huggingface_hub.utils import logging as hf_logging

    if sys.stderr.isatty():
        hf_logging.set_verbosity_warning()
    else:
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
            _backoff(attempt, last, where)
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
    raise SourceError(
        f"{last}; gave up after {RETRIES + 1} attempts",
        where,
        "retry later, check HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only the local cache",
    )


def download_vision_checkpoint(
    repo_id: str, *, revision: str | None = None, allow_pickle: bool = False, also: Callable[[str], bool] | None = None
) -> Path:
    """Fetch config, preprocessor config and the weight files that hold vision tensors.

    safetensors first: for a sharded repo the index is read and only the shards holding vision
    tensors are fetched. With ``allow_pickle``, a repo without safetensors falls back to
    ``pytorch_model.bin`` (or its index), which callers must read with ``weights_only=True``.
    ``also``: more keys whose shards to fetch (a VLM's projector). Returns the snapshot folder (in the hub cache).
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
            extra = [k for k in weight_map if also is not None and also(k)]
            for shard in sorted({weight_map[src].name for src in [*mapping.values(), *extra]}):
                hub_file(repo_id, shard, revision=revision)
            return config.parent
        if hub_file(repo_id, single_name, revision=revision, optional=True) is not None:
            return config.parent
    raise SourceError(
        "no safetensors weights in the repo" + ("" if allow_pickle else " (pickle .bin files are not loaded here)"),
        f"{repo_id}@{revision or 'main'}",
        "convert it with siglip-convert, which reads .bin safely",
    )


# -- ranged reads: only the vision tensors' bytes of each shard -------------------------------------------
RANGE_REQUEST_BYTES = 64 << 20  # one request at most: a retry never repeats more than this
_CHUNK = 1 << 20


@dataclass
class RangedRead:
    """What was fetched of one weight file, and what could be checked (conversion.json records it)."""

    repo_file: str  # "repo@commit: filename"
    size: int  # the whole file's bytes, as the hub reports them
    sha256: str | None  # the hub's sha256 of the whole file: NOT checked, only part of it was read
    ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, end) fetched, header included
    requests: int = 0

    @property
    def bytes_fetched(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def record(self) -> dict[str, object]:
        return {
            "file": self.repo_file,
            "sha256": self.sha256,
            "sha256_checked": False,
            "bytes": self.size,
            "bytes_fetched": self.bytes_fetched,
            "requests": self.requests,
            "ranges": [list(r) for r in self.ranges],
            "checked": [
                "header read by range and validated (dtypes, shapes, offsets inside the hub's file size, no overlaps)",
                "every range answered 206 with the requested Content-Range and exactly its length",
                "every converted tensor's values finite (unless --allow-nonfinite)",
            ],
            "not_checked": "the file's sha256: a partial read cannot be hashed (--full-download downloads and checks it)",
        }


def _stream(url: str, start: int, end: int):
    """A streamed ``GET`` of bytes [start, end) through huggingface_hub's HTTP layer (its session, auth
    headers, retries with backoff on 5xx and dropped connections): a context manager yielding the
    response and an iterator over its body."""
    from contextlib import contextmanager

    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, http_backoff

    headers = {**build_hf_headers(), "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
    kw = {"max_retries": RETRIES, "base_wait_time": BACKOFF_S, "headers": headers}
    kw["timeout"] = constants.HF_HUB_DOWNLOAD_TIMEOUT

    @contextmanager
    def opened():
        try:
            from huggingface_hub.utils import http_stream_backoff  # huggingface_hub >= 1.0 (httpx)
        except ImportError:  # 0.x (requests)
            response = http_backoff("GET", url, stream=True, **kw)
            try:
                yield response, response.iter_content(_CHUNK)
            finally:
                response.close()
            return
        with http_stream_backoff("GET", url, **kw) as response:
            yield response, response.iter_bytes(_CHUNK)

    return opened()


def _fetch_range(url: str, start: int, end: int, sink, read: RangedRead, where: str) -> None:
    """Write bytes [start, end) of ``url`` into ``sink`` at the same offsets. A short or dropped body is
    resumed from where it stopped (``RETRIES`` times); a server that ignores ``Range`` is an error."""
    from huggingface_hub.utils import hf_raise_for_status

    transient = _transient_errors()
    pos, failures, last = start, 0, ""
    while pos < end:
        if failures > RETRIES:
            raise SourceError(
                f"{last}; gave up after {RETRIES + 1} attempts", where, "retry later, or use --full-download"
            )
        if failures:
            _backoff(failures, last, where)
        read.requests += 1
        try:
            with _stream(url, pos, end) as (response, body):
                if response.status_code == 200:
                    raise SourceError(
                        "the hub ignored the HTTP Range request (answered 200 with the whole file)",
                        where,
                        "use --full-download",
                    )
                if response.status_code != 206:
                    hf_raise_for_status(response)
                    raise SourceError(f"hub answered HTTP {response.status_code} to a range request", where, None)
                wanted = f"bytes {pos}-{end - 1}/{read.size}"
                got = response.headers.get("Content-Range", "")
                if got != wanted:
                    raise SourceError(
                        f"the hub answered Content-Range {got or '(none)'!r} to a request for {wanted!r}",
                        where,
                        "use --full-download",
                    )
                sink.seek(pos)
                try:  # caught here, not thrown into the hub client's retrying context manager
                    for chunk in body:
                        take = chunk[: end - pos]
                        sink.write(take)
                        pos += len(take)
                        if pos >= end:
                            break
                except transient as exc:
                    last = f"range cut short ({_describe(exc)})"
        except SourceError:
            raise
        except transient as exc:
            last = f"network error ({_describe(exc)})"
        except Exception as exc:  # the hub client's HTTP errors (after its own retries)
            status = getattr(getattr(exc, "response", None), "status_code", None)
            raise SourceError(
                f"range request failed ({_describe(exc)})",
                where,
                "retry later" if status is None or status >= 500 else "check HF_TOKEN and the revision",
            ) from None
        if pos < end:
            failures += 1
            last = last or f"range cut short (the hub sent {pos - start} of {end - start} bytes)"
    read.ranges.append((start, end))


def _file_metadata(url: str, where: str, *, missing_ok: bool):
    """HEAD: the file's size and the hub's sha256, retried like a download; None if it does not exist
    and ``missing_ok``."""
    from huggingface_hub import constants, get_hf_file_metadata

    transient = _transient_errors()
    last = ""
    for attempt in range(RETRIES + 1):
        if attempt:
            _backoff(attempt, last, where)
        try:
            return get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except transient as exc:
            last = f"network error ({_describe(exc)})"
        except Exception as exc:  # the hub client's HTTP errors
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status == 404 and missing_ok:
                return None
            last = f"cannot read the file's size ({_describe(exc)})"
            if status is not None and status < 500 and status != 429:
                raise SourceError(last, where, "check the repo id, revision and HF_TOKEN") from None
    raise SourceError(
        f"{last}; gave up after {RETRIES + 1} attempts",
        where,
        "retry later, check HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only the local cache",
    )


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, adjacent spans joined, then cut at ``RANGE_REQUEST_BYTES``."""
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out = []
    for a, b in merged:
        out += [(s, min(s + RANGE_REQUEST_BYTES, b)) for s in range(a, b, RANGE_REQUEST_BYTES)]
    return out


def fetch_vision_ranges(
    repo_id: str, *, revision: str | None, scratch: Path, also: Callable[[str], bool] | None = None
) -> tuple[Path, str | None, dict[str, RangedRead]]:
    """Fetch a safetensors repo's vision tensors by HTTP range requests, not whole shards.

    Config, preprocessor config and index come through `hub_file` (verified, cached). Each shard that
    holds vision tensors and is not already in the cache is read as: 8 bytes, the header, then only
    the byte ranges of the tensors `map_vision_keys` keeps (all tensors if it keeps none: a timm or
    open_clip file), into a sparse file of the shard's true size in ``scratch``. Whole shards already
    in the cache are used as they are. Returns (a folder laid out like the snapshot, the commit, what
    was fetched per ranged file). Repos with only pickle weights raise ``LookupError`` (a pickle
    cannot be read in ranges: the caller downloads them whole). ``also``: more source keys to fetch (a VLM's
    projector for ``siglip-convert --with-projector``).
    """
    from huggingface_hub import hf_hub_url, try_to_load_from_cache

    from .checkpoint import read_safetensors_header

    config = hub_file(repo_id, "config.json", revision=revision)
    assert config is not None
    snapshot = config.parent
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    files = [config, hub_file(repo_id, PREPROCESSOR_NAME, revision=revision, optional=True)]
    index = hub_file(repo_id, INDEX_NAME, revision=revision, optional=True)
    if index is not None:
        files.append(index)
        weight_map = read_index(index)
        mapping, _, _ = map_vision_keys(weight_map)
        extra = [k for k in weight_map if also is not None and also(k)]
        shards = sorted({weight_map[src].name for src in [*mapping.values(), *extra]})
    else:
        shards = [WEIGHTS_NAME]
    for f in files:
        if f is not None:
            (scratch / f.name).symlink_to(f.resolve())
    reads: dict[str, RangedRead] = {}
    for shard in shards:
        cached = try_to_load_from_cache(repo_id, shard, revision=commit or revision)
        if isinstance(cached, str):
            (scratch / shard).symlink_to(Path(cached).resolve())
            continue
        where = f"{repo_id}@{commit or revision or 'main'}: {shard}"
        url = hf_hub_url(repo_id, shard, revision=commit or revision)
        meta = _file_metadata(url, where, missing_ok=index is None)
        if meta is None:
            raise LookupError(shard)  # no model.safetensors: pickle weights, downloaded whole by the caller
        if meta.size is None or meta.size < 8:
            raise SourceError(
                f"the hub reports no usable size ({meta.size}) for this file", where, "use --full-download"
            )
        read = RangedRead(where, meta.size, meta.etag if meta.etag and is_sha256(meta.etag) else None)
        path = scratch / shard
        with open(path, "wb") as sink:
            sink.truncate(meta.size)  # sparse: the bytes never fetched take no disk
            _fetch_range(url, 0, 8, sink, read, where)
            sink.flush()
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_HEADER_BYTES or 8 + n > meta.size:
                raise CheckpointError(
                    f"header length {n} does not fit the {meta.size}-byte file", where, "use --full-download"
                )
            _fetch_range(url, 8, 8 + n, sink, read, where)
        tensors, _ = read_safetensors_header(path)
        kept, _, _ = map_vision_keys(tensors)
        extra = [k for k in tensors if also is not None and also(k)]
        wanted = [tensors[k] for k in ([*kept.values(), *extra] if kept else tensors)]
        with open(path, "r+b") as sink:
            for a, b in _merge([(t.start, t.end) for t in wanted if t.end > t.start]):
                _fetch_range(url, a, b, sink, read, where)
        reads[shard] = read
    return scratch, commit, reads
