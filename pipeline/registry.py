"""One registry type for every pluggable kind: models, attacks, patch losses, defenses,
training hooks, adjustments and analyses.

A :class:`Registry` maps a name to an entry (a class, a function or a frozen record). It is
filled by the modules of one package, each registering its own entries with a decorator when
imported; the registry finds them by importing every module of that package the first time
a name is looked up (*package discovery*). Adding a method is therefore one new module in
the package: there is no list of modules to keep, and a module that fails to import raises
its own error instead of being skipped.

Example::

    ATTACKS: Registry[type[Attack]] = Registry("attack", "pipeline.attacks")

    @ATTACKS.decorator("fgsm")
    class FGSM(Attack): ...

    ATTACKS.get("fgsm")  # -> FGSM; imports pipeline.attacks.* once
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, filled by package discovery.

    Args:
        kind: what an entry is, in error messages (``"attack"``, ``"defense"``, ...).
        package: dotted name of the package whose modules register the entries; ``None`` for
            a registry filled only by explicit :meth:`add` calls.
        ordered: ``names()`` in registration order (``True``) or sorted (``False``, default).

    The registry imports ``package`` and each of its direct modules once, at the first
    :meth:`get`, :meth:`names`, :meth:`items` or ``in``; registering is allowed at any time
    (a user's module may register its own entries after discovery).
    """

    def __init__(self, kind: str, package: str | None, *, ordered: bool = False) -> None:
        self.kind = kind
        self.package = package
        self.ordered = ordered
        self._entries: dict[str, T] = {}
        self._discovered = package is None
        self._discovering = False

    def discover(self) -> None:
        """Import every module of the package (once; idempotent and re-entrant).

        Raises:
            Exception: whatever a module raises on import (never swallowed).
        """
        if self._discovered or self._discovering:
            return
        self._discovering = True
        try:
            pkg = importlib.import_module(self.package)  # type: ignore[arg-type]
            for module in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"{self.package}.{module.name}")
            self._discovered = True
        finally:
            self._discovering = False

    def add(self, name: str, entry: T, *, same: Callable[[T, T], bool] | None = None) -> T:
        """Register ``entry`` under ``name`` and return it.

        Args:
            same: ``same(old, new)`` says whether a second registration under a taken name is
                the same entry (a module imported twice, e.g. as a script and as a module),
                which is then accepted; without it, a taken name is always an error.

        Raises:
            ValueError: ``name`` is empty or taken by another entry.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries and not (same is not None and same(self._entries[name], entry)):
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> T | None:
        """Unregister ``name`` (a test's or a notebook's temporary entry); returns its entry, or None."""
        return self._entries.pop(name, None)

    def decorator(self, name: str, **kwargs: object) -> Callable[[T], T]:
        """``@registry.decorator(name)``: :meth:`add` the decorated object under ``name``."""

        def register(entry: T) -> T:
            return self.add(name, entry, **kwargs)  # type: ignore[arg-type]

        return register

    def names(self) -> list[str]:
        """Registered names (sorted, or in registration order when ``ordered``); a new list."""
        self.discover()
        return list(self._entries) if self.ordered else sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs in :meth:`names` order; a new list."""
        return [(name, self._entries[name]) for name in self.names()]

    def get(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            ValueError: no such name; the one-line message lists the registered names.
        """
        self.discover()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.unknown(name) from None

    def unknown(self, name: object) -> ValueError:
        """The error for an unknown ``name`` (``unknown <kind> 'x'; choose one of: a, b``)."""
        return ValueError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.discover()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.package!r}, {len(self._entries)} registered)"
