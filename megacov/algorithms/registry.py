"""One small name -> object registry shared by the advantage estimators, policy losses and entropy
controllers, so that every ``algorithm.<key>=<name>`` setting fails the same way on a typo: with a
message that lists what is registered."""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, initial: dict[str, T] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = dict(initial or {})

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make ``obj`` selectable by ``name``; re-registering another object is an error."""
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            return obj
        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} '{name}'; registered: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)
