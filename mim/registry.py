"""The registries' one decorator: each part kind (targets, heads, methods, tokenizer kinds) keeps a dict name ->
class, filled by `@register(name)` in the module that defines the class, as timm registers models."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict[str, type], attr: str = "name") -> Callable[[str], Callable[[T], T]]:
    """The decorator factory of `table`: `@register(name)` sets `cls.<attr> = name` and `table[name] = cls`."""
    def register(name: str) -> Callable[[T], T]:
        def deco(cls: T) -> T:
            setattr(cls, attr, name)
            table[name] = cls
            return cls
        return deco
    return register
