"""A typed setting: a dataclass field with its meaning."""

import dataclasses
from dataclasses import field
from typing import Any, Callable, Optional


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Optional[Callable[[], Any]] = None):
    """A dataclass field with its meaning (`help` metadata, shown in docs/configuration.md)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": doc})
    return field(default=default, metadata={"help": doc})
