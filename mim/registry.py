"""The registries' one decorator: each part kind (targets, heads, methods, tokenizer kinds) keeps a dict name ->
class, filled by `@register(name)` in the module that defines the class, as timm registers models."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict[str, type], attr: str = "name", sections: dict[str, type | None] | None = None,
              recipes: dict[str, dict] | None = None) -> Callable[[str], Callable[[T], T]]:
    """The decorator factory of `table`: `@register(name)` sets `cls.<attr> = name` and `table[name] = cls`, and
    records the class's `Config` in `sections` and its `recipe` in `recipes` (when given): the tables a command's
    config is built from without importing the parts' modules (mimkit.parts)."""
    def register(name: str) -> Callable[[T], T]:
        def deco(cls: T) -> T:
            setattr(cls, attr, name)
            table[name] = cls
            if sections is not None:
                sections[name] = cls.Config
            if recipes is not None:
                recipes[name] = cls.recipe
            return cls
        return deco
    return register
