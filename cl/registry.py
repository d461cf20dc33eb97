"""A small explicit registry used for strategies and scenario generators.

Names must be ``lower_snake`` and unique; an unknown name raises ``KeyError`` listing the
available names and the closest match (PEFT/timm style, but strict).
"""

from __future__ import annotations

import difflib
import re
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def closest(name: str, options: list[str] | tuple[str, ...]) -> str:
    """Return a ``did you mean`` suffix for ``name`` among ``options`` ('' when none is close)."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


class Registry(Generic[T]):
    """Maps names to entries; fails loudly on duplicates, bad names and unknown look-ups."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``.

        Raises:
            ValueError: if the name is not lower_snake or already registered.
        """
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lower_snake (e.g. 'my_method')")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """Look ``name`` up.

        Raises:
            KeyError: naming the available entries and the closest match.
        """
        try:
            return self._entries[name]
        except KeyError:
            avail = sorted(self._entries)
            raise KeyError(
                f"unknown {self.kind} {name!r}; available: {', '.join(avail)}{closest(name, avail)}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
