"""`convert`: plan, write atomically, record provenance, optionally verify."""

from __future__ import annotations

import datetime as _dt
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import siglip_scratch
from siglip_scratch.checkpoint import DTYPE_NAMES
from siglip_scratch.errors import InputError, OutputError, SiglipScratchError
from siglip_scratch.files import sha256_file

from .sources import Plan, plan_conversion
from .writer import OutputFolder, WrittenFile, disk_full, parse_size, write_json, write_safetensors

__all__ = ["ConvertResult", "convert"]

# Output dtypes: the run dtypes less float64 (no hub checkpoint is stored in float64).
DTYPES = {k: v for k, v in DTYPE_NAMES.items() if k != "float64"}


@dataclass
class ConvertResult:
    output: Path
    plan: Plan
    files: list[WrittenFile] = field(default_factory=list)
    verify_report: Any = None


def convert(
    source: str,
    output_dir: str | os.PathLike[str],
    *,
    revision: str | None = None,
    dtype: str | None = None,
    no_head: bool = False,
    config: str | None = None,
    max_shard_size: str | int | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
    hidden_act: str | None = None,
    full_download: bool = False,
    keep_source: bool = False,
    with_projector: bool = False,
) -> ConvertResult:
    """Convert ``source`` into a vision-only safetensors folder at ``output_dir``.

    Args:
        source: hub repo id, local HF folder, or a .safetensors / .bin / .pt / .npz file.
        dtype: cast floating tensors to float32, bfloat16 or float16 (default: keep).
        no_head: drop the MAP head and set ``vision_use_head: false``.
        config: a config.json to use instead of the source's (or of the one inferred from shapes).
        max_shard_size: shard past this many bytes ("5GB", "500MB", or an int).
        hidden_act: "gelu" or "gelu_pytorch_tanh" instead of what the config says (timm and open_clip
            state dicts carry no activation: tanh is assumed, as the checkpoints were trained).
        full_download: for a hub source, download whole shards (sha256-checked, cached) instead of
            reading only the vision tensors' byte ranges.
        keep_source: keep a ranged read's scratch files after returning (for ``--verify``; call
            ``result.plan.close()`` when done). Otherwise they are removed before this returns.
        with_projector: a VLM source's projector too, every key in the VLM's hub layout, under the VLM's own
            config.json: the folder transformers' VLM class and ``siglip-parity --image-features`` read.
    Raises:
        SiglipScratchError subclasses; on any error nothing is left at ``output_dir``.
    """
    out_dtype = None
    if dtype is not None:
        if dtype not in DTYPES:
            raise InputError(f"unsupported dtype {dtype!r}", "--dtype", f"use one of {', '.join(DTYPES)}")
        out_dtype = DTYPES[dtype]
    shard_limit = parse_size(str(max_shard_size)) if max_shard_size is not None else None
    folder = OutputFolder(Path(output_dir), force=force)
    folder.check()  # refuse before downloading or reading anything

    plan = plan_conversion(
        source,
        revision=revision,
        config_file=config,
        no_head=no_head,
        hidden_act=hidden_act,
        full_download=full_download,
        with_projector=with_projector,
    )
    try:
        log(f"source: {plan.detected}")
        log(f"layout: {plan.layout}")
        for note in plan.notes:
            log(f"note: {note}")
        for f in plan.inputs:
            if f.ranged is not None:
                r = f.ranged
                log(
                    f"fetched {r.bytes_fetched / 1e6:.1f} of {r.size / 1e6:.1f} MB of {r.repo_file} by {r.requests} "
                    "range request(s) (the vision tensors only; its sha256 cannot be checked on a partial read, "
                    "--full-download checks it)"
                )

        items = [
            (p, out_dtype if (out_dtype is not None and p.dtype.is_floating_point) else p.dtype) for p in plan.tensors
        ]
        shards = _split(items, shard_limit)
        total = sum(int(torch.Size(p.shape).numel()) * d.itemsize for p, d in items)
        metadata = {
            "format": "pt",
            "siglip_scratch.source": source,
            "siglip_scratch.version": siglip_scratch.__version__,
        }

        bar = _progress(total, progress)
        result = ConvertResult(Path(output_dir), plan)
        pool = ThreadPoolExecutor(max_workers=1)  # input hashes, concurrently with the writes
        stop = threading.Event()  # set on failure so the worker does not hash gigabytes for nothing
        pending = {
            str(f.path): pool.submit(sha256_file, f.path, stop=stop)
            for f in plan.inputs
            if f.sha256 is None and f.ranged is None
        }
        try:
            with folder as tmp:
                try:
                    for i, shard in enumerate(shards):
                        name = (
                            "model.safetensors"
                            if len(shards) == 1
                            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                        )
                        result.files.append(
                            write_safetensors(
                                tmp / name, shard, metadata, allow_nonfinite=allow_nonfinite, on_bytes=bar
                            )
                        )
                    if len(shards) > 1:
                        weight_map = {
                            p.key: f.name for f, shard in zip(result.files, shards, strict=True) for p, _ in shard
                        }
                        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                        result.files.append(write_json(tmp / "model.safetensors.index.json", index))
                    config_dict = plan.vlm_config if plan.vlm_config is not None else plan.config.to_dict()
                    result.files.append(write_json(tmp / "config.json", config_dict))
                    result.files.append(write_json(tmp / "preprocessor_config.json", plan.preprocessor))
                    inputs = [
                        f.ranged.record()
                        if f.ranged is not None
                        else {
                            "file": str(f.path),
                            "sha256": f.sha256 or pending[str(f.path)].result(),
                            "bytes": _size(f.path),
                        }
                        for f in plan.inputs
                    ]
                    write_json(
                        tmp / "conversion.json",
                        _record(source, plan, inputs, result.files, dtype, no_head, shard_limit),
                    )
                except SiglipScratchError:
                    raise  # SourceError/OutputError are OSErrors too: keep their own message
                except OSError as exc:
                    if disk_full(exc):
                        raise OutputError(
                            "disk full (or file size limit) while writing", str(output_dir), "free space"
                        ) from None
                    raise OutputError(f"cannot write output ({exc.strerror})", str(output_dir), None) from None
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            bar(None)
        size_mb = sum(f.bytes for f in result.files) / 1e6
        log(
            f"wrote {result.output} ({len(plan.tensors)} tensors, {size_mb:.1f} MB, "
            f"{dtype or 'source dtype'}, {len(shards)} shard(s); preprocessor {plan.preprocessor_from})"
        )
    finally:
        if not keep_source:
            plan.close()
    return result


def _split(items: list, limit: int | None) -> list[list]:
    if limit is None:
        return [items]
    shards: list[list] = [[]]
    size = 0
    for p, d in items:
        n = int(torch.Size(p.shape).numel()) * d.itemsize
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((p, d))
        size += n
    return shards


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _record(source, plan: Plan, inputs, files: list[WrittenFile], dtype, no_head, shard_limit) -> dict[str, Any]:
    return {
        "tool": "siglip-convert",
        "version": siglip_scratch.__version__,
        "torch": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "argument": source,
            "kind": plan.kind,
            "detected": plan.detected,
            "layout": plan.layout,
            **{k: v for k, v in plan.provenance.items() if k != "source"},
        },
        "options": {
            "dtype": dtype,
            "no_head": no_head,
            "max_shard_size": shard_limit,
            "with_projector": plan.vlm_config is not None,
        },
        "notes": plan.notes,
        "preprocessor": plan.preprocessor_from,
        "tensors": len(plan.tensors),
        "dropped_tensors": plan.dropped,
        "inputs": inputs,
        "outputs": [{"file": f.name, "sha256": f.sha256, "bytes": f.bytes} for f in files],
    }


def _progress(total: int, enabled: bool) -> Callable[[int | None], None]:
    if not enabled:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing", leave=False)

    def update(n: int | None) -> None:
        if n is None:
            bar.close()
        else:
            bar.update(n)

    return update
