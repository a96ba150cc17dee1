"""``siglip-parity``: compare an encoder with transformers site by site and gate CI.

Exit codes: 0 every site passes, 1 a parity failure (or the golden reference moved), 2 a usage or
input error (one line on stderr, no traceback unless --debug), 3 an internal error (a bug in
siglip-scratch: one line, --debug for the traceback).

    >>> main(["--preset", "google/siglip-base-patch16-224", "--batch", "1", "--depth", "coarse", "--quiet"])
    PASS: ...
    0
    >>> main(["--mode", "sideways"])  # a usage error: one line on stderr, before torch is imported
    2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from siglip_scratch.cli_common import EXIT_FAIL, EXIT_OK, OneLineParser, parse, run
from siglip_scratch.errors import OutputError


def add_weight_source(p: argparse.ArgumentParser, title: str, seed_default: int | None) -> None:
    """The weight-source arguments, shared by the comparison, ``inspect`` and ``export-inputs``."""
    src = p.add_argument_group(title)
    src.add_argument("--weights", metavar="PATH", help="model folder, HF folder/snapshot, or .safetensors file")
    src.add_argument("--model", metavar="HUB_ID", help="hub repo id (local HF cache when offline)")
    src.add_argument("--preset", metavar="HUB_ID", help="deterministic synthetic weights at this hub id's config")
    src.add_argument("--revision", help="hub revision for --model")
    src.add_argument(
        "--seed", type=int, default=seed_default, help="seed for synthetic weights and random pixels (default 0)"
    )
    src.add_argument(
        "--synthetic",
        choices=["trained", "iid"],
        default="trained",
        help="synthetic weights' regime for --preset: trained (default: a trained tower's activations, a few "
        "residual channels in the hundreds, attention logits in the tens) or iid (the plain N(0, 1/fan_in) draw)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="siglip-parity",
        description="Compare a SigLIP vision encoder with transformers.SiglipVisionModel, site by site. "
        "`siglip-parity inspect --candidate X` shows how a candidate's names map (see inspect --help).",
        epilog="Exit codes: 0 pass, 1 parity failure, 2 usage or input error, 3 internal error.",
    )
    add_weight_source(p, "weights (exactly one)", None)

    cand = p.add_argument_group("candidate")
    cand.add_argument(
        "--candidate",
        metavar="MODULE:FACTORY",
        help="module.path:factory, file.py:factory, or model.onnx (run by onnxruntime; its sites found by the "
        "module paths in its node names) (default: ours)",
    )
    cand.add_argument(
        "--rename",
        metavar="MAP.json",
        help='{"rename": [["regex", "replacement"], ...]} from candidate names to canonical ones (default: '
        "inferred from the candidate's shapes, names and outputs, and reported; `siglip-parity inspect` shows it)",
    )
    cand.add_argument(
        "--allow-unloaded",
        metavar="REGEX",
        action="append",
        default=[],
        help="candidate parameters (full-match regex on their key) that may stay unloaded; repeatable. "
        "Without it, any parameter the checkpoint did not fill fails the run",
    )

    cand.add_argument(
        "--candidate-activations",
        metavar="FILE",
        help="a port's outputs per site (.safetensors or .npz, keys isolated/<site> and propagated/<site>), "
        "computed on the inputs `siglip-parity export-inputs` wrote; judged like a PyTorch candidate "
        "(default: not used)",
    )
    cand.add_argument(
        "--inputs",
        metavar="DIR",
        help="the export-inputs folder the activations were computed on (default: the activations file's folder)",
    )
    cand.add_argument(
        "--layout",
        metavar="REGEX=TRANSFORM",
        action="append",
        default=[],
        help="declare a layout difference for the sites REGEX matches, TRANSFORM one of add_batch ([N, D] -> "
        "[1, N, D]), nhwc_tokens ([B, h, w, D]), nchw_tokens ([B, D, h, w]), bdn_to_bnd ([B, D, N]); repeatable "
        "(default: none, the file follows the site contract)",
    )
    cand.add_argument(
        "--candidate-processor",
        metavar="MODULE:FN",
        help="a function from a PIL image to pixel values [3, H, W], judged against transformers' image processor "
        "on built-in probe images (non-square, small, large, alpha, grayscale, palette), with the likely cause of a "
        "difference; alone it is judged alone, with --candidate both are (default: not checked)",
    )
    cand.add_argument(
        "--processor-backend",
        choices=("pil", "torchvision"),
        help="the transformers image-processor backend the --candidate-processor ports, judged exactly (within one "
        "uint8 level); the two differ by up to 20 levels on some images (default: the one transformers' "
        "AutoImageProcessor gives on this machine)",
    )
    cand.add_argument(
        "--skip-site",
        metavar="REGEX",
        action="append",
        default=[],
        help="canonical sites (full-match regex) that do not apply to the candidate: reported SKIPPED, not "
        "compared and never counted as passing; repeatable",
    )

    cand.add_argument(
        "--image-features",
        action="store_true",
        help="judge up to the image features a VLM's language model receives (--weights/--model: the VLM's own "
        "checkpoint): the tower's sites it uses, vision_feature (the hidden state it selects) and "
        "multi_modal_projector; the candidate returns the image features (default: the tower alone)",
    )

    run = p.add_argument_group("run")
    run.add_argument(
        "--mode",
        choices=["both", "propagated", "isolated"],
        default=None,
        help="isolated: each candidate site gets the reference's input to it (exact blame); propagated: both "
        "run end to end (the accumulated effect); both (default; with --candidate-activations, the modes the "
        "file carries): the two, failing if either fails",
    )
    run.add_argument(
        "--depth",
        choices=["coarse", "fine"],
        default=None,
        help="fine (default; with --candidate-activations, coarse when the file carries no sub-layer site): embeddings, each layer's layer_norm1, self_attn, layer_norm2, mlp and the layer, "
        "post_layernorm, head; coarse: without the sub-layer sites (less memory, but a sub-layer bug can hide "
        "in the residual stream)",
    )
    run.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16, float16 or float64 (default float32; with --candidate-activations, the export's)",
    )
    run.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    run.add_argument(
        "--attn",
        choices=["sdpa", "eager"],
        default="sdpa",
        help="the reference's attention implementation, and ours when we are the candidate (default sdpa)",
    )
    run.add_argument("--images", nargs="+", metavar="FILE", help="images through our image processor")
    run.add_argument("--batch", type=int, default=None, help="random images when --images is not given (default 2)")
    run.add_argument(
        "--atol",
        type=float,
        help="switch from the float64-oracle rule to the absolute rule max|Δ| <= atol + rtol·max|x_ref| "
        "(the one not given takes its per-dtype default; the report says which rule judged)",
    )
    run.add_argument("--rtol", type=float, help="see --atol")

    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the report as JSON")
    out.add_argument("--markdown", metavar="FILE", help="write the report as Markdown (CI job summaries)")
    out.add_argument("--plot", metavar="FILE.png", help="per-site error plot (needs matplotlib)")
    out.add_argument("--quiet", action="store_true", help="print only the verdict (and no progress lines)")
    out.add_argument(
        "--progress",
        action="store_true",
        help="a line on stderr as each phase starts, and per site group (embeddings, layer i/n, …) when a phase runs over 2 s, with the time so far (default: only when stderr is a terminal)",
    )

    gold = p.add_argument_group("golden fingerprints (has the reference itself moved?)")
    gold.add_argument("--check-golden", action="store_true", help="compare the reference with parity/golden/")
    gold.add_argument("--update-golden", action="store_true", help="rewrite parity/golden/ from this reference")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def build_inspect_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="siglip-parity inspect",
        description="Show how a candidate's modules and parameters meet the canonical sites and keys, and "
        "the rename map that joins them (inferred when --rename is not given).",
        epilog="Exit codes: 0 shown, 2 usage or input error, 3 internal error.",
    )
    p.add_argument(
        "--candidate", required=True, metavar="MODULE:FACTORY", help="module.path:factory or file.py:factory"
    )
    p.add_argument("--rename", metavar="MAP.json", help="a map to check instead of inferring one")
    p.add_argument("--write-rename", metavar="FILE", help="save the map (inferred or given) as a --rename file")
    p.add_argument(
        "--image-features",
        action="store_true",
        help="a VLM candidate (the weights: a VLM checkpoint or preset): its vision_feature and projector too",
    )
    add_weight_source(p, "weights (at most one; default: synthetic google/siglip-base-patch16-224)", 0)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def build_export_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="siglip-parity export-inputs",
        description="Write the comparison's inputs for a port in another framework: inputs.safetensors "
        "(pixel_values, and input.<site>: the reference's input to every site, for isolated mode), "
        "manifest.json and, for synthetic weights, weights.safetensors. Run the port on them, save its outputs "
        "per site, then judge them with siglip-parity --candidate-activations FILE.",
        epilog="Exit codes: 0 written, 2 usage or input error, 3 internal error.",
    )
    p.add_argument("dir", metavar="DIR", help="a new or empty folder")
    add_weight_source(p, "weights (at most one; default: synthetic google/siglip-base-patch16-224)", 0)
    p.add_argument("--images", nargs="+", metavar="FILE", help="images through the model's processor (default: random)")
    p.add_argument("--batch", type=int, default=2, help="random images when --images is not given (default 2)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or float64 (default float32)")
    p.add_argument(
        "--with-weights",
        action="store_true",
        help="also write weights.safetensors for real weights (default: only for synthetic ones, which a port "
        "cannot get elsewhere)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inspect"]:
        args = parse(build_inspect_parser(), argv[1:])
        return args if isinstance(args, int) else run(_inspect, args)
    if argv[:1] == ["export-inputs"]:
        args = parse(build_export_parser(), argv[1:])
        return args if isinstance(args, int) else run(_export, args)
    args = parse(build_parser(), argv)
    return args if isinstance(args, int) else run(_main, args)


def _inspect(args: argparse.Namespace) -> int:
    from siglip_scratch.errors import InputError

    from .inspection import inspect_candidate

    if sum(bool(v) for v in (args.weights, args.model, args.preset)) > 1:
        raise InputError("give at most one of --weights, --model, --preset", "weights", None)
    if args.write_rename:
        target = Path(args.write_rename)
        if target.is_dir() or not target.resolve().parent.is_dir():
            raise OutputError("not a writable file path", args.write_rename, "give a file in an existing folder")
    result = inspect_candidate(
        args.candidate,
        weights=args.weights,
        model=args.model,
        preset=args.preset,
        seed=args.seed,
        rename=args.rename,
        revision=args.revision,
        synthetic=args.synthetic,
        image_features=args.image_features,
    )
    print(result.text())
    if args.write_rename:
        result.write_rename(args.write_rename)
        print(f"wrote {args.write_rename}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from siglip_scratch.errors import InputError

    from .activations import export_inputs
    from .weights import dtype_name

    if sum(bool(v) for v in (args.weights, args.model, args.preset)) > 1:
        raise InputError("give at most one of --weights, --model, --preset", "weights", None)
    target = Path(args.dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OutputError("exists and is not an empty folder", args.dir, "give a new or empty folder")
    if not target.resolve().parent.is_dir():
        raise OutputError("parent folder does not exist", args.dir, "create it first")
    out = export_inputs(
        target,
        weights=args.weights,
        model=args.model,
        preset=args.preset,
        seed=args.seed,
        batch=args.batch,
        images=args.images,
        dtype=dtype_name(args.dtype),
        revision=args.revision,
        with_weights=True if args.with_weights else None,
        synthetic=args.synthetic,
    )
    print(
        f"wrote {out}: inputs.safetensors, manifest.json"
        + (", weights.safetensors" if (out / "weights.safetensors").exists() else "")
    )
    print(f"next: run your port on them, then siglip-parity --candidate-activations YOUR_FILE --inputs {out}")
    return EXIT_OK


def _check_combinations(args: argparse.Namespace) -> None:
    """Flags that would be silently ignored are usage errors, raised before any work."""
    from siglip_scratch.errors import InputError

    golden = args.check_golden or args.update_golden
    if golden:
        ignored = [
            f
            for f, v in (
                ("--weights", args.weights),
                ("--model", args.model),
                ("--candidate", args.candidate),
                ("--rename", args.rename),
            )
            if v
        ]
        if ignored:
            raise InputError(
                f"--check-golden/--update-golden run the pinned synthetic cases and would ignore {', '.join(ignored)}",
                "golden",
                "drop them (only --preset selects a golden case)",
            )
    if args.candidate_activations:
        clash = [
            f
            for f, v in (
                ("--candidate", args.candidate),
                ("--allow-unloaded", args.allow_unloaded),
                ("--images", args.images),
                ("--batch", args.batch),
                ("--seed", args.seed),
                ("--dtype", args.dtype),
                ("--candidate-processor", args.candidate_processor),
            )
            if v not in (None, [], False)
        ]
        if clash:
            raise InputError(
                f"--candidate-activations judges the export's inputs, weights and dtype; {', '.join(clash)} would be ignored",
                "--candidate-activations",
                "drop them (export-inputs takes --images/--batch/--seed/--dtype)",
            )
    for flag, value in (("--inputs", args.inputs), ("--layout", args.layout)):
        if value and not args.candidate_activations:
            raise InputError(
                f"{flag} applies to --candidate-activations, which was not given",
                flag,
                "add --candidate-activations FILE",
            )
    if args.processor_backend and not args.candidate_processor:
        raise InputError(
            "--processor-backend applies to --candidate-processor, which was not given",
            "--processor-backend",
            "add --candidate-processor MODULE:FN",
        )
    from .candidates import TRANSFORMS

    for spec in args.layout:
        _, sep, name = spec.rpartition("=")
        if not sep or name not in TRANSFORMS:
            raise InputError(
                f"--layout {spec!r} is not REGEX=TRANSFORM", "--layout", f"TRANSFORM is one of {', '.join(TRANSFORMS)}"
            )
    if args.rename and not (args.candidate or args.candidate_activations):
        raise InputError(
            "--rename renames a candidate's modules, but no --candidate was given (nor --candidate-activations)",
            "--rename",
            "add --candidate module:factory",
        )
    if args.allow_unloaded and not args.candidate:
        raise InputError(
            "--allow-unloaded applies to a candidate, but no --candidate was given",
            "--allow-unloaded",
            "add --candidate module:factory",
        )
    for name in ("json", "markdown", "plot"):
        target = getattr(args, name)
        if target and Path(target).is_dir():
            raise OutputError("is a folder, not a file", target, f"give --{name} a file path")
        if target and not Path(target).resolve().parent.is_dir():
            raise OutputError("output folder does not exist", target, "create it first")
        if target:
            _try_create(target, f"--{name}")
    if args.preset:
        from siglip_scratch.config import get_preset

        get_preset(args.preset)  # a misspelt preset fails now, with "did you mean", not after the imports
    if args.plot and Path(args.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
        raise InputError(
            f"cannot tell the plot format from {Path(args.plot).suffix or 'no suffix'!r}",
            args.plot,
            "end the name in .png, .pdf or .svg",
        )


def _main(args: argparse.Namespace) -> int:
    _check_combinations(args)
    if args.check_golden or args.update_golden:
        from .golden import run_golden

        presets = [args.preset] if args.preset else None
        return EXIT_OK if run_golden(presets, update=args.update_golden) else EXIT_FAIL

    from . import render
    from .candidates import load_rename_map, open_candidate
    from .compare import compare
    from .options import RunOptions
    from .weights import check_device

    check_device(args.device)  # before any weights are read
    activations = bool(args.candidate_activations)
    opts = RunOptions.from_args(args, **({"dtype": "float32"} if activations else {}))
    if not activations:
        opts.checked()  # every flag value, before anything is imported or read
    rules = load_rename_map(args.rename) if args.rename else ([] if activations else None)  # None: inferred
    pre = _check_processor(args) if args.candidate_processor else None
    if pre is not None and not args.candidate:  # the processor alone is what is being judged
        print(pre.verdict if args.quiet else pre.table())
        for target, text in (
            (args.json, lambda: json.dumps(pre.to_dict(), indent=2)),
            (args.markdown, lambda: render.processor_markdown(pre)),
        ):
            if target:
                _write(target, text())
        return EXIT_OK if pre.passed else EXIT_FAIL
    # The candidate is opened (its file imported, an export read) before any model is built.
    candidate = open_candidate(
        args.candidate_activations or args.candidate, inputs_dir=args.inputs, layouts=_layouts(args)
    )
    report = compare(options=opts, candidate=candidate, rename=rules, progress=_progress_printer(args))
    if pre is not None:
        print(pre.verdict if args.quiet else pre.table())
    print(report.verdict if args.quiet else report.table())
    for target, text in (
        (args.json, lambda: render.combined_json(report, pre)),
        (args.markdown, lambda: render.combined_markdown(report, pre)),
    ):
        if target:
            _write(target, text())
    if args.plot:
        report.plot(args.plot)
    return EXIT_OK if report.passed and (pre is None or pre.passed) else EXIT_FAIL


def _layouts(args: argparse.Namespace) -> list:
    import re

    from siglip_scratch.errors import InputError

    layouts = []
    for spec in args.layout:
        pattern, _, name = spec.rpartition("=")
        try:
            layouts.append((re.compile(pattern), name))
        except re.error as exc:
            raise InputError(
                f"--layout pattern {pattern!r} does not compile ({exc})", "--layout", "fix the regex"
            ) from None
    return layouts


def _check_processor(args: argparse.Namespace):
    """The candidate processor against transformers' processor for the chosen weights source."""
    from siglip_scratch.errors import InputError
    from siglip_scratch.processor import SiglipImageProcessor

    from .preprocess import compare_processor, load_processor_callable, processor_for_source

    say = _progress_printer(args) or (lambda line: None)
    fn = load_processor_callable(args.candidate_processor)
    say("preprocessing: candidate processor against transformers' on the probe images")
    processor = processor_for_source(args.weights, args.model, args.preset, args.revision)
    if not isinstance(processor, SiglipImageProcessor):
        raise InputError(
            "--candidate-processor judges fixed-resolution processors (an image to [3, H, W]); SigLIP 2 NaFlex's "
            "patchifying processor is not covered yet",
            "--candidate-processor",
            "compare it with siglip_scratch.Siglip2ImageProcessor, which equals transformers' (tests/test_naflex.py)",
        )
    return compare_processor(fn, processor, name=args.candidate_processor, backend=args.processor_backend)


def _progress_printer(args: argparse.Namespace):
    """Phase lines on stderr (``[  12.3s] candidate: isolated run``), or None."""
    import time

    if args.quiet or not (args.progress or sys.stderr.isatty()):
        return None
    t0 = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {line}", file=sys.stderr, flush=True)

    return say


def _try_create(target: str, flag: str) -> None:
    """Fail now, not after the run, when an output file cannot be written (``/proc/r.json``, a read-only folder);
    a file this check creates is removed again."""
    path = Path(target)
    existed = path.exists()
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write ({exc.strerror})", target, f"give {flag} a writable file path") from None
    if not existed:
        path.unlink(missing_ok=True)


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write ({exc.strerror})", path, "check the path and permissions") from None


if __name__ == "__main__":
    sys.exit(main())
