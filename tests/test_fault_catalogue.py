"""Every case of benchmarks/fault_catalogue.py ends in its expected clear refusal or full recovery."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

_spec = importlib.util.spec_from_file_location("fault_catalogue", Path(__file__).resolve().parents[1] / "benchmarks" / "fault_catalogue.py")
catalogue = sys.modules["fault_catalogue"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(catalogue)


@pytest.mark.parametrize("case", catalogue.CASES, ids=lambda c: c.name)
def test_fault_is_handled(case, request):
    if "(Ray)" in case.group:
        request.getfixturevalue("ray_session")  # the suite's one Ray, not one of the case's own
    handled, observed = catalogue.run_case(case)
    assert handled, f"{case.name}: expected {case.expect}; observed {observed}"
