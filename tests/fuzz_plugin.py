"""Counts the examples Hypothesis runs and the property tests that fail, for issue 24's target
(>= 5,000 generated examples per CI run, 0 violations).

Each ``@given`` test's inner function is wrapped while the test runs, so every example it is
called with is counted; the count rides on the test's report (``user_properties``), which
pytest-xdist carries from its workers to the controller, where the totals are printed at the end
(``fuzz_examples=``, ``fuzz_violations=``) and, with ``TREELORA_FUZZ_REPORT=<file>``, written as JSON.
"""

from __future__ import annotations

import json
import os

import pytest

_KEY = "fuzz_examples"


class FuzzCounter:
    def __init__(self) -> None:
        self.examples = 0
        self.violations = 0
        self.tests = 0

    def pytest_collection_modifyitems(self, config, items):
        """``TREELORA_FUZZ_ONLY=1`` (benchmarks/fuzz_boundaries.py): keep only the property tests."""
        if os.environ.get("TREELORA_FUZZ_ONLY") != "1":
            return
        keep = [item for item in items if getattr(getattr(item, "obj", None), "hypothesis", None) is not None]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        handle = getattr(getattr(item, "obj", None), "hypothesis", None)
        if handle is None:
            yield
            return
        inner, count = handle.inner_test, [0]

        def counted(*args, **kwargs):
            count[0] += 1
            return inner(*args, **kwargs)

        handle.inner_test = counted
        try:
            yield
        finally:
            handle.inner_test = inner
            item.user_properties.append((_KEY, count[0]))

    def pytest_runtest_logreport(self, report):
        if report.when != "call":
            return
        found = [n for key, n in report.user_properties if key == _KEY]
        if found:
            self.tests += 1
            self.examples += found[0]
            self.violations += int(report.failed)

    def pytest_terminal_summary(self, terminalreporter):
        if os.environ.get("PYTEST_XDIST_WORKER") or not self.tests:
            return
        terminalreporter.write_line(f"fuzz_tests={self.tests}")
        terminalreporter.write_line(f"fuzz_examples={self.examples}")
        terminalreporter.write_line(f"fuzz_violations={self.violations}")
        out = os.environ.get("TREELORA_FUZZ_REPORT")
        if out:
            with open(out, "w") as f:
                json.dump({"tests": self.tests, "examples": self.examples, "violations": self.violations}, f)
