"""The parity harness: compare a SigLIP vision encoder with transformers, site by site.

Installed as ``siglip_scratch.parity`` (see ARCHITECTURE.md). transformers is imported only
when a reference is built, so importing this package never needs it.
"""

from .compare import assert_parity, compare
from .inputs import make_pixels
from .judge import DEFAULT_TOLERANCES, ORACLE_RULES, SiteResult
from .options import RunOptions
from .report import Report
from .sites import compile_rename, site_names
from .weights import Weights, resolve_weights

__all__ = [
    "DEFAULT_TOLERANCES",
    "ORACLE_RULES",
    "Report",
    "RunOptions",
    "SiteResult",
    "Weights",
    "assert_parity",
    "compare",
    "compile_rename",
    "make_pixels",
    "resolve_weights",
    "site_names",
]
