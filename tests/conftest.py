"""Shared pytest configuration.

Long runs (full Autobahn, soak, benchmarks) are marked ``slow`` and are opt-in: pass ``--run-slow``
(or set ``HUB_RUN_SLOW=1``). They are reported as skipped with that reason, never silently dropped;
``make test-slow`` runs exactly them, and CI runs it after ``make test``.

The black-box WebSocket tests take the server implementation from the ``websockets`` fixture:
``hub.ws`` by default, or the real ``websockets`` library with ``HUB_TEST_IMPL=websockets``, which
checks the tests themselves against the library whose API ``hub.ws`` copies. Tests marked
``hub_only`` pin behaviour where our spec is stricter than that library; under
``HUB_TEST_IMPL=websockets`` they are strict xfails, so a marker that is no longer needed shows.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
from hubproc import hubs  # noqa: F401 (the fixture of real ``hub serve`` processes)
from nodefix import node_modules  # noqa: F401 (tests/node/node_modules, npm ci on first use)

IMPL = os.environ.get("HUB_TEST_IMPL", "hub")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the long opt-in tests")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which Redis (and compose) path runs, and why: containers or local processes."""
    import dockerfix

    return [f"redis and compose tests: {dockerfix.engine()[1]}"]


def pytest_configure(config: pytest.Config) -> None:
    import dockerfix

    if dockerfix.required() and not dockerfix.enabled():
        raise pytest.UsageError(f"HUB_TEST_DOCKER=1, but {dockerfix.engine()[1]}")
    config.addinivalue_line(
        "markers",
        "hub_only(reason): spec behaviour the websockets library lacks; "
        "xfail under HUB_TEST_IMPL=websockets",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IMPL == "websockets":
        for item in items:
            marker = item.get_closest_marker("hub_only")
            if marker is not None:
                reason = marker.args[0] if marker.args else "stricter than websockets"
                item.add_marker(pytest.mark.xfail(reason=f"hub_only: {reason}", strict=True))
    if config.getoption("--run-slow") or os.environ.get("HUB_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="opt-in: long run, use --run-slow or HUB_RUN_SLOW=1")
    for item in items:
        if item.get_closest_marker("slow") is not None:  # the marker, not a name containing it
            item.add_marker(skip)


@pytest.fixture
def websockets() -> ModuleType:
    """The server implementation under test, named so spec examples read verbatim.

    ``import hub.ws as websockets`` is all an application changes, so tests use this module the
    way the examples use theirs. Clients always come from the real ``websockets`` library.
    """
    if IMPL == "websockets":
        return importlib.import_module("websockets")
    if IMPL != "hub":
        pytest.fail(f"HUB_TEST_IMPL={IMPL!r}: expected 'hub' or 'websockets'")
    module = importlib.import_module("hub.ws")
    if not hasattr(module, "serve"):
        pytest.fail("hub.ws does not export serve yet")
    return module
