"""The parity harness: compare a SigLIP vision encoder with transformers, site by site.

Installed as ``siglip_scratch.parity`` (see ARCHITECTURE.md). transformers is imported only
when a reference is built, so importing this package never needs it.
"""

from .compare import Weights, assert_parity, compare, make_pixels, resolve_weights
from .report import DEFAULT_TOLERANCES, ORACLE_RULES, Report, SiteResult
from .sites import compile_rename, site_names

__all__ = [
    "DEFAULT_TOLERANCES",
    "ORACLE_RULES",
    "Report",
    "SiteResult",
    "Weights",
    "assert_parity",
    "compare",
    "compile_rename",
    "make_pixels",
    "resolve_weights",
    "site_names",
]
