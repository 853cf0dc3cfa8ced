"""Whether a plain value fits a type annotation, and how to say what was expected.

The settings of a run (critbatch.config) and a task's options (critbatch.tasks) are checked
against their annotations with these, so a wrong type fails before anything runs, with a message
that names the key and what it takes: `optimizer.weight_decay='abc' must be a number`.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import os
import types
import typing
from typing import Any, Literal, Union


def matches(value, hint) -> bool:
    """True when `value` (a plain value: number, string, list, dict, None) fits the annotation
    `hint`. An int is a number but a bool is not; a path is a string; an annotation this does
    not know (a class of the caller's own) is not checked."""
    if hint is Any or hint is object:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        return any(matches(value, arg) for arg in args)
    if hint is None or hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {member.value for member in hint}
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, os.PathLike))
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
        return not args or all(matches(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    return isinstance(value, hint) if isinstance(hint, type) else True


_PLURAL = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}


def describe(hint) -> str:
    """What `hint` asks for, in words: 'an integer', 'a list of numbers', 'a number or null'."""
    if hint is Any or hint is object:
        return "any value"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        named = [describe(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if hint is None or hint is type(None):
        return "null"
    if origin is Literal:
        return f"one of {list(args)}"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return f"one of {[member.value for member in hint]}"
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in simple:
        return simple[hint]
    if origin in (list, tuple) or hint in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            kinds = {_PLURAL.get(a, describe(a)) for a in args}
            return f"a list of {len(args)} {kinds.pop()}" if len(kinds) == 1 else f"a list like {list(args)}"
        return f"a list of {_PLURAL.get(args[0], describe(args[0]))}" if args else "a list"
    if origin is dict or hint is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


@functools.lru_cache(maxsize=None)
def field_hints(cls) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
