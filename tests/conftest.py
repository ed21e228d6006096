"""Shared pytest configuration.

Long runs (full Autobahn, soak, benchmarks) are marked ``slow`` and are opt-in: pass ``--run-slow``
(or set ``HUB_RUN_SLOW=1``). They are reported as skipped with that reason, never silently dropped.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the long opt-in tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("HUB_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="opt-in: long run, use --run-slow or HUB_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
