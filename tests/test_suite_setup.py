"""The suite's own set-up: the groups ``tests/conftest.py`` gives pytest-xdist take effect.

pytest-xdist's ``--dist loadgroup`` learns a test's group from a suffix it appends to the test's
node id (``tests/x.py::test@group``), from the ``xdist_group`` marks it sees when it collects.
The conftest adds those marks in its own collection hook, which must run before xdist's (it is
``tryfirst``); and on pytest 9.2 xdist's suffix is silently lost (pytest-xdist issue #1386), so
``constraints.txt`` keeps pytest under 9.2. Either way every test would be dealt out alone: each
worker would make the quick benchmark report and start a Ray instance of its own (the suite took
16 min 40 s so, against 12 min 15 s grouped, on 2026-12-03). This test fails if that happens.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def module_wide() -> str:
    """Module-scoped: the conftest keeps this module's tests in one group, named after it."""
    return "made once"


def test_a_test_the_conftest_groups_carries_its_group_to_the_xdist_scheduler(
    request, module_wide
) -> None:
    group = "tests/test_suite_setup.py"
    marks = [m.args[0] for m in request.node.iter_markers("xdist_group")]
    assert marks == [group]
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return  # one process (-n 0): no scheduler to tell
    assert request.config.getvalue("loadgroup"), "the suite runs with --dist loadgroup"
    assert request.node.nodeid.endswith(f"@{group}"), request.node.nodeid
