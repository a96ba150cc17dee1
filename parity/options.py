"""`RunOptions`: everything that decides how a comparison runs, checked in one place before any work.

The CLI and the Python API build the same object (``RunOptions(**kwargs)`` / `RunOptions.from_args`), so a
flag and a keyword argument cannot drift apart.

    >>> RunOptions(preset="google/siglip-base-patch16-224", dtype="bf16").checked().dtype
    'bfloat16'
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from siglip_scratch.errors import InputError

from .judge import Rule
from .weights import check_device, dtype_name

__all__ = ["MODES", "Mode", "RunOptions"]

Mode = Literal["both", "propagated", "isolated"]
MODES = ("both", "propagated", "isolated")


@dataclass
class RunOptions:
    """How to run one comparison (see `compare` for each field's meaning)."""

    weights: Any = None  # a path, or a `Weights` already loaded
    model: str | None = None
    preset: str | None = None
    revision: str | None = None
    seed: int = 0
    synthetic: str = "trained"  # the regime of synthetic weights (--preset): "trained" or "iid"
    mode: Mode | None = None  # None: "both", or the modes an activations file carries
    depth: str | None = None  # None: "fine", or "coarse" for an activations file without sub-layer sites
    dtype: Any = "float32"
    device: str = "cpu"
    attn: str = "sdpa"
    images: Sequence[str | os.PathLike[str]] | None = None
    batch: int = 2
    atol: float | None = None
    rtol: float | None = None
    allow_unloaded: Sequence[str] = ()
    skip_sites: Sequence[str] = ()
    image_features: bool = False  # judge up to a VLM's image features (`vlm.py`), not the tower alone
    # Derived by `checked`: compiled patterns and the pass rule.
    allowed: list[re.Pattern[str]] = field(default_factory=list, repr=False)
    skips: list[re.Pattern[str]] = field(default_factory=list, repr=False)
    rule: Rule | None = field(default=None, repr=False)

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.name not in ("allowed", "skips", "rule")}

    def checked(self) -> RunOptions:
        """A copy with every value validated (one-line `InputError` naming the flag) and the derived fields set."""
        if self.mode is None or self.depth is None:
            return dataclasses.replace(self, mode=self.mode or "both", depth=self.depth or "fine").checked()
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}", "--mode", f"use one of {', '.join(MODES)}")
        if self.depth not in ("coarse", "fine"):
            raise InputError(f"unknown depth {self.depth!r}", "--depth", "use coarse or fine")
        if self.attn not in ("sdpa", "eager"):
            raise InputError(f"unknown attention {self.attn!r}", "--attn", "use sdpa or eager")
        check_device(self.device)
        name = dtype_name(self.dtype)
        if (self.atol is not None and self.atol < 0) or (self.rtol is not None and self.rtol < 0):
            raise InputError("tolerances must be >= 0", "--atol/--rtol", None)
        return dataclasses.replace(
            self,
            dtype=name,
            rule=Rule(name, self.atol, self.rtol),
            allowed=compile_patterns(self.allow_unloaded, "--allow-unloaded"),
            skips=compile_patterns(self.skip_sites, "--skip-site"),
        )

    def truth_fields(self) -> dict[str, Any]:
        """What `truth.run_truth` takes from the options."""
        return {"mode": self.mode, "depth": self.depth, "attn": self.attn, "skips": self.skips}

    def load_fields(self, names: Sequence[str]) -> dict[str, Any]:
        """What `Candidate.load` takes from the options (and the run's site names)."""
        return {"names": names, "attn": self.attn, "allowed": self.allowed}

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> RunOptions:
        """From the CLI's parsed arguments (the same names, with ``skip_site`` for ``--skip-site``)."""
        values = {
            "weights": args.weights,
            "model": args.model,
            "preset": args.preset,
            "revision": args.revision,
            "seed": 0 if args.seed is None else args.seed,
            "synthetic": args.synthetic,
            "mode": args.mode,
            "depth": args.depth,
            "dtype": "float32" if args.dtype is None else args.dtype,
            "device": args.device,
            "attn": args.attn,
            "images": args.images,
            "batch": 2 if args.batch is None else args.batch,
            "atol": args.atol,
            "rtol": args.rtol,
            "allow_unloaded": args.allow_unloaded,
            "skip_sites": args.skip_site,
            "image_features": getattr(args, "image_features", False),
        }
        values.update(overrides)
        return cls(**values)


def compile_patterns(patterns: Sequence[str] | str, flag: str) -> list[re.Pattern[str]]:
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise InputError(f"pattern {p!r} does not compile ({exc})", flag, "fix the regex") from None
    return out
