"""The README's reference sections against the code: every setting (with its environment name and
default), every namespace option, close code and metric is documented, and every file the README
points to exists. A new setting or metric without its line in the README fails here."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from hub.config import Namespace, Settings, load_settings
from hub.errors import CloseCode
from hub.metrics import Metrics

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


def test_every_close_code_is_in_the_table() -> None:
    rows = table_rows(section("Close codes"))
    for code in CloseCode:
        assert str(int(code)) in rows, f"close code {int(code)} ({code.name}) undocumented"
        advice = rows[str(int(code))][2]
        if code >= 4000:
            assert ("not reconnect" in advice) == (not code.reconnect), code


def test_every_metric_is_in_the_table() -> None:
    rows = table_rows(section("Metrics"))
    documented = {re.sub(r"\{.*\}", "", name) for name in rows}
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name in documented, f"metric {name} undocumented in the README"


def test_the_files_the_readme_points_to_exist() -> None:
    for path in re.findall(r"`((?:docs|deploy|scripts|tests|bench)/[\w./-]+)`", README):
        assert (ROOT / path).exists(), path
