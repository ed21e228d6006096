"""The README's reference sections against the code: every setting (with its environment name and
default), every namespace option, close code and metric is documented, and every file the README
points to exists. A new setting or metric without its line in the README fails here."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import tomllib
import typing
import warnings
from pathlib import Path

import pytest

from hub.config import Namespace, Settings, load_settings
from hub.errors import CloseCode
from hub.metrics import Metrics, PublishSource

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def table_rows(text: str) -> dict[str, list[str]]:
    """First cell (without backticks) -> all cells, for every row of the markdown tables."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    return rows


def shown(value: object) -> str:
    """How the README writes a default."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return "[" + ",".join(f'"{v}"' for v in value) + "]"
    return str(value)


SETTINGS = [f for f in dataclasses.fields(Settings) if f.name != "namespaces"]


@pytest.mark.parametrize("field", SETTINGS, ids=lambda f: f.name)
def test_every_setting_is_in_the_configuration_reference(field: dataclasses.Field) -> None:
    rows = table_rows(section("Configuration reference"))
    assert field.name in rows, f"README configuration reference lacks {field.name}"
    _, env, default, *_ = rows[field.name]
    assert env == f"`HUB_{field.name.upper()}`"
    value = field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]
    assert shown(value) in default.replace("`", ""), f"{field.name}: default {value!r}"


def test_the_namespace_example_names_every_option_and_loads(tmp_path: Path) -> None:
    text = section("Configuration reference")
    block = re.search(r"```toml\n(.*?)```", text, re.S)
    assert block is not None
    table = tomllib.loads(block.group(1))["namespaces"]["chat"]
    options = {f.name for f in dataclasses.fields(Namespace)} - {"name"}
    assert set(table) == options
    config = tmp_path / "hub.toml"
    config.write_text(block.group(1))
    settings = load_settings(config_file=str(config), env={})
    assert settings.namespace("chat:lobby").publish is True


def close_code_table(text: str) -> str:
    """The table under "## Close codes" of a markdown page."""
    start = text.index("\n## Close codes\n")
    table = re.search(r"\n(\| code \|.*?\n)(?!\|)", text[start:], re.S)
    assert table is not None, "no close-code table"
    return table.group(1)


def test_one_close_code_table_everywhere_matching_the_code() -> None:
    """README.md and docs/protocol.md carry the same table, and it lists exactly the codes of
    hub.errors.CloseCode (the codes the hub sends), with the advice its reconnect rule gives."""
    readme = close_code_table(README)
    assert close_code_table((ROOT / "docs" / "protocol.md").read_text()) == readme
    rows = table_rows(readme)
    del rows["code"]
    assert sorted(rows) == sorted(str(int(code)) for code in CloseCode)
    for code in CloseCode:
        advice = rows[str(int(code))][2]
        assert advice.startswith("not reconnect" if not code.reconnect else "reconnect"), code


def test_hub_js_follows_the_same_reconnect_rule() -> None:
    """hub.js's mayReconnect, run in Node, agrees with CloseCode.reconnect on every code."""
    node = shutil.which("node")
    assert node is not None, "node is needed (scripts/system-deps.sh installs nodejs)"
    codes = [int(code) for code in CloseCode]
    script = (
        f"import {{ mayReconnect }} from {json.dumps((ROOT / 'hub/static/hub.js').as_uri())};"
        f"console.log(JSON.stringify({json.dumps(codes)}.map(mayReconnect)));"
    )
    done = subprocess.run(
        [node, "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(done.stdout) == [CloseCode(code).reconnect for code in codes]


def test_the_published_sources_are_the_documented_ones() -> None:
    cell = table_rows(section("Metrics"))["hub_messages_published_total{source}"][2]
    documented = set(re.findall(r"`(\w+)` \(", cell))
    assert documented == set(typing.get_args(PublishSource))


def test_the_build_metadata_loads_without_deprecation_warnings() -> None:
    """pyproject.toml as the build backend reads it: ``project.license`` is an SPDX string, so a
    first install prints no setuptools deprecation warning; the build requires a setuptools that
    knows that form."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["build-system"]["requires"] == ["setuptools>=77"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))
    assert [str(w.message) for w in caught if "license" in str(w.message).lower()] == []
    assert dist.metadata.license_expression == "MIT"


def test_every_metric_is_in_the_table() -> None:
    rows = table_rows(section("Metrics"))
    documented = {re.sub(r"\{.*\}", "", name) for name in rows}
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name in documented, f"metric {name} undocumented in the README"


def test_every_inbox_metric_is_in_docs_inbox_and_operations() -> None:
    """The inbox's metrics live on the node's registry (``hub.notify.InboxMetrics``), not in
    the README's table: docs/inbox.md says what each counts, operations.md what to watch."""
    from types import SimpleNamespace

    from hub.notify import InboxMetrics

    metrics = Metrics()
    InboxMetrics(SimpleNamespace(metrics=metrics))  # type: ignore[arg-type]
    inbox = (ROOT / "docs" / "inbox.md").read_text()
    operations = (ROOT / "docs" / "operations.md").read_text()
    names = [
        family.name + ("_total" if family.type == "counter" else "")
        for family in metrics.registry.collect()
        if family.name.startswith("hub_inbox_")
    ]
    assert len(names) >= 14
    for name in names:
        short = name.removeprefix("hub_inbox_")
        assert f"`{short}" in inbox or f"`{name}`" in inbox, f"{name} undocumented in inbox.md"
        assert f"`{name}" in operations, f"{name} undocumented in operations.md"
    assert "`hub_inbox_*`" in section("Metrics")


def test_the_files_the_readme_points_to_exist() -> None:
    for path in re.findall(r"`((?:docs|deploy|scripts|tests|bench)/[\w./-]+)`", README):
        assert (ROOT / path).exists(), path
