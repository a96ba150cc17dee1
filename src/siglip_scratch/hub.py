"""Fetching checkpoints through huggingface_hub: only the files the vision tower needs.

The real hub client does the work (revisions, the cache under ``HF_HOME``/``HF_HUB_CACHE``,
``HF_TOKEN``, ``HF_HUB_OFFLINE=1``, ``HF_ENDPOINT``); this module decides *which* files, and turns
the client's exceptions into one-line `SourceError`s that say what to do.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import INDEX_NAME, WEIGHTS_NAME, map_vision_keys, read_index
from .errors import SourceError

__all__ = ["download_vision_checkpoint", "hub_file"]

PREPROCESSOR_NAME = "preprocessor_config.json"
BIN_INDEX_NAME, BIN_WEIGHTS_NAME = "pytorch_model.bin.index.json", "pytorch_model.bin"


def hub_file(repo_id: str, filename: str, *, revision: str | None = None, optional: bool = False) -> Path | None:
    """Download one file (or take it from the cache). ``optional`` files that do not exist give None."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    where = f"{repo_id}@{revision or 'main'}: {filename}"
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
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
    # LocalEntryNotFoundError subclasses EntryNotFoundError: it must come first.
    except hf_errors.LocalEntryNotFoundError:
        if optional:
            return None
        raise SourceError(
            "not in the local cache and the hub cannot be reached",
            where,
            "download it once with network access (or unset HF_HUB_OFFLINE), or pass a local folder",
        ) from None
    except hf_errors.EntryNotFoundError:
        if optional:
            return None
        raise SourceError("file not found in the repo", where, "check that this is a SigLIP checkpoint") from None
    except hf_errors.HfHubHTTPError as exc:
        raise SourceError(f"hub request failed: {exc}".splitlines()[0], where, "retry later") from None
    except OSError as exc:
        raise SourceError(f"download failed: {exc}", where, "check the network and disk space") from None


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
