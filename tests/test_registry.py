"""Tests of pipeline.registry.Registry: package discovery, name checks, errors."""

from __future__ import annotations

import sys
import textwrap
import uuid

import pytest

from pipeline.registry import Registry


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """A fresh importable package ``<name>`` with a module-level registry in ``base.py``;
    returns ``(name, folder)``; its modules are removed from ``sys.modules`` afterwards."""
    name = f"plugins_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text(textwrap.dedent(f"""
        from pipeline.registry import Registry
        THINGS = Registry("thing", "{name}")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, pkg
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def _module(pkg, file, name, value):
    (pkg / file).write_text(textwrap.dedent(f"""
        from {pkg.name}.base import THINGS
        THINGS.add({name!r}, {value!r})
    """))


def test_discovery_finds_every_module_of_the_package(plugin_package):
    name, pkg = plugin_package
    _module(pkg, "one.py", "b_one", 1)
    _module(pkg, "two.py", "a_two", 2)
    things = __import__(f"{name}.base", fromlist=["THINGS"]).THINGS
    assert things.names() == ["a_two", "b_one"]  # sorted, both modules imported without a list
    assert things.get("b_one") == 1 and "a_two" in things and len(things) == 2
    assert things.items() == [("a_two", 2), ("b_one", 1)]


def test_a_module_that_fails_to_import_is_an_error_not_a_gap(plugin_package):
    name, pkg = plugin_package
    _module(pkg, "good.py", "good", 1)
    (pkg / "broken.py").write_text("import a_module_that_does_not_exist_anywhere\n")
    things = __import__(f"{name}.base", fromlist=["THINGS"]).THINGS
    with pytest.raises(ModuleNotFoundError, match="a_module_that_does_not_exist_anywhere"):
        things.names()


def test_unknown_name_lists_the_registered_ones():
    reg: Registry[int] = Registry("widget", None)
    reg.add("beta", 2)
    reg.add("alpha", 1)
    with pytest.raises(ValueError, match=r"^unknown widget 'gamma'; choose one of: alpha, beta$"):
        reg.get("gamma")
    with pytest.raises(ValueError, match="unknown widget"):
        reg.get(["not", "a", "name"])  # type: ignore[arg-type]


def test_taken_names_are_refused_unless_the_entry_is_the_same():
    reg: Registry[object] = Registry("widget", None, ordered=True)
    fn = object()
    reg.add("z", fn)
    reg.add("a", 1)
    with pytest.raises(ValueError, match="widget 'z' is already registered"):
        reg.add("z", object())
    assert reg.add("z", fn, same=lambda old, new: old is new) is fn  # a module imported twice
    with pytest.raises(ValueError, match="already registered"):
        reg.add("z", object(), same=lambda old, new: old is new)
    with pytest.raises(ValueError, match="non-empty string"):
        reg.add("", 3)
    assert reg.names() == ["z", "a"]  # registration order
    assert reg.remove("z") is fn and reg.names() == ["a"] and reg.remove("z") is None


def test_decorator_registers_and_returns_the_object():
    reg: Registry[type] = Registry("widget", None)

    @reg.decorator("thing")
    class Thing:
        pass

    assert reg.get("thing") is Thing
