"""``siglip-convert SOURCE OUTPUT_DIR``: any SigLIP checkpoint to a vision-only safetensors folder.

Exit codes: 0 success, 1 ``--verify`` found the output differs from the source or fails parity, 2 usage
or input error (one line on stderr, no traceback unless --debug), 3 internal error. SIGINT and SIGTERM
leave nothing at OUTPUT_DIR.

    >>> main(["/no/such/checkpoint.npz", "out/"])  # one line on stderr: npz file not found (…): check the path
    2
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from siglip_scratch.cli_common import EXIT_FAIL, EXIT_OK, OneLineParser, parse, run


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="siglip-convert",
        description="Convert a SigLIP / PaliGemma / big_vision / timm checkpoint into a vision-only "
        "safetensors folder that siglip_scratch and transformers.SiglipVisionModel both load.",
        epilog="Exit codes: 0 success, 1 --verify failed, 2 usage or input error, 3 internal error.",
    )
    p.add_argument("source", help="hub repo id, local HF folder, or a .safetensors/.bin/.pt/.npz file")
    p.add_argument("output_dir", help="folder to create (refused if it exists and is not empty, unless --force)")
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast floating tensors")
    p.add_argument("--no-head", action="store_true", help="drop the MAP head (vision_use_head: false)")
    p.add_argument(
        "--with-projector",
        action="store_true",
        help="a VLM source: keep its projector too, in the VLM's hub layout under its own config.json (what "
        "transformers' VLM class and siglip-parity --image-features read); default: the vision tower alone",
    )
    p.add_argument("--config", metavar="FILE", help="config.json to use instead of the source's or the inferred one")
    p.add_argument(
        "--hidden-act",
        choices=["gelu_pytorch_tanh", "gelu"],
        help="the activation to write into config.json instead of the source's; timm/open_clip state dicts "
        "carry none and get gelu_pytorch_tanh (the training numerics) unless this says gelu (what timm runs)",
    )
    p.add_argument("--max-shard-size", metavar="SIZE", help="shard past this size, e.g. 2GB")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUTPUT_DIR")
    p.add_argument(
        "--full-download",
        action="store_true",
        help="hub sources: download whole shards (sha256-checked, kept in the HF cache) instead of reading only "
        "the vision tensors' byte ranges (the default; a partial read cannot be checked against the file's sha256)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the output against the source (big_vision/timm computed natively, HF layouts tensor by "
        "tensor), then run the parity harness on it; exit 1 if either fails",
    )
    p.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf weights instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bars or detection lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


class _Terminated(KeyboardInterrupt):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    if args.quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

    def interrupted(exc: KeyboardInterrupt) -> tuple[str, int]:
        from pathlib import Path

        from .writer import COMMITTED

        what, code = ("terminated", 143) if isinstance(exc, _Terminated) else ("interrupted", 130)
        if Path(args.output_dir).absolute() in COMMITTED or Path(args.output_dir).resolve() in COMMITTED:
            return f"{what} after {args.output_dir} was written completely (it is whole and usable)", code
        return f"{what}; nothing was written to {args.output_dir}", code

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(_main, args, on_interrupt=interrupted)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    from .converter import convert

    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    result = convert(
        args.source,
        args.output_dir,
        revision=args.revision,
        dtype=args.dtype,
        no_head=args.no_head,
        config=args.config,
        max_shard_size=args.max_shard_size,
        force=args.force,
        allow_nonfinite=args.allow_nonfinite,
        progress=not args.quiet and sys.stderr.isatty(),
        log=log,
        hidden_act=args.hidden_act,
        full_download=args.full_download,
        keep_source=args.verify,
        with_projector=args.with_projector,
    )
    if not args.verify:
        return EXIT_OK
    from .converter import DTYPES
    from .verify import verify_output

    out_dtype = DTYPES.get(args.dtype) if args.dtype else None
    try:
        passed, text = verify_output(
            result.output,
            dtype=args.dtype or "float32",
            plan=result.plan,
            out_dtype=out_dtype,
            progress=None if args.quiet else _progress(),
        )
    finally:
        result.plan.close()
    print(text)
    return EXIT_OK if passed else EXIT_FAIL


def _progress():
    """Timestamped lines on stderr, on a terminal and in a pipe alike (--verify runs for a minute on so400m)."""
    import time

    t0 = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {line}", file=sys.stderr, flush=True)

    return say


if __name__ == "__main__":
    sys.exit(main())
