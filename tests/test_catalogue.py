"""docs/ERRORS.md and the tests agree: every catalogued error has a test, every claimed ID exists."""

import importlib
import re
from pathlib import Path

import pytest

from .catalogue import COVERED

ROOT = Path(__file__).resolve().parents[1]


def catalogue_ids() -> list[str]:
    text = (ROOT / "docs" / "ERRORS.md").read_text(encoding="utf-8")
    return re.findall(r"^\| ([A-Z]\d\d) \|", text, flags=re.M)


def test_every_catalogued_error_has_a_test():
    # Import every test module so all @covers decorators have run, whatever subset pytest selected.
    # A module that skips itself at import (an optional dependency) covers nothing: tolerate it.
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        try:
            importlib.import_module(f"tests.{path.stem}")
        except pytest.skip.Exception:
            pass
    ids = catalogue_ids()
    assert len(ids) == len(set(ids)), "duplicate IDs in docs/ERRORS.md"
    assert len(ids) >= 60
    missing = [i for i in ids if not COVERED.get(i)]
    assert not missing, f"catalogued errors without a test: {missing}"
    unknown = sorted(set(COVERED) - set(ids))
    assert not unknown, f"tests claim IDs that docs/ERRORS.md does not list: {unknown}"
