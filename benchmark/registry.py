"""Small timm-style registries: things registered by name with a one-line description.

    @METHODS.register("r50_abmil", "ResNet-50-trunc patch features + CLAM gated ABMIL")
    def r50_abmil(**overrides): ...

    METHODS.create("r50_abmil", lr=1e-4)

An unknown name raises `UnknownNameError`, whose message lists the closest registered names; the CLI
turns it into exit code 2.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


class UnknownNameError(KeyError):
    """A name that no registry entry has. `str(err)` is a one-line message for the user."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
        hint = f"closest: {', '.join(close)}" if close else f"known: {', '.join(sorted(known))}"
        super().__init__(f"unknown {kind} '{name}' ({hint}); `python run_benchmark.py --list` shows all")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    obj: Any
    meta: dict = field(default_factory=dict)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, description: str, **meta) -> Callable[[Any], Any]:
        def decorator(obj):
            self.add(name, obj, description, **meta)
            return obj

        return decorator

    def add(self, name: str, obj: Any, description: str, **meta) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = Entry(name, description, obj, meta)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, list(self._entries)) from None

    def create(self, name: str, **kwargs) -> Any:
        return self.get(name).obj(**kwargs)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())


METHODS = Registry("method")
DATASETS = Registry("dataset")
ENCODERS = Registry("encoder")
AGGREGATORS = Registry("aggregator")


def load_all() -> None:
    """Import the packages whose modules register entries (methods, encoders, cohorts)."""
    import datasets.cohorts  # noqa: F401
    import methods  # noqa: F401
