"""What every stage config is built from: pydantic v2 does the checking, this module says how it reads to a user.

``@config`` makes a frozen pydantic dataclass that refuses unknown keys and validates its defaults too. It stays a
standard-library dataclass, so ``dataclasses.fields``, ``replace`` (which validates again, as construction does) and
``asdict`` keep working; a bad value raises one ``ValueError`` line ``field: why``, never pydantic's multi-line report.
Ranges are ``Field`` constraints (``Annotated[StrictInt, Field(ge=1)]``), choices ``Literal`` types. A field's
``description`` is the hint its range message carries in parentheses; on a list that must not be empty
(``min_length=1``) it names one entry ("give at least one model"). Checks pydantic cannot state (registries,
cross-field rules) live in a ``model_validator(mode="after")`` that raises ``ValueError("field: why")``.

Scalars are pydantic's ``StrictInt``/``StrictFloat``/``StrictStr``/``StrictBool``, in code as in YAML: a str is never
an int, a bool never a number, an int does become a float. Strictness at validation time only (``strict=True``) would
leave code lax, but pydantic dataclasses then refuse mappings for nested sections, wanting instances; JSON-mode
validation cannot take ``Many``'s single values. ``Many[T]`` is a tuple that also takes a list or a single value (one
shard pattern where a list is expected); anything else (a mapping, a set) is refused.

``LATE`` marks a field added after runs were already identified by their config's digest: ``identity_tree`` (what the
digest hashes) leaves such a field out while it holds its default, so a run started before the field existed resumes
with its finished stages intact (``Annotated[StrictStr, LATE] = ""``).

``one_line`` turns a ``ValidationError`` into the message the CLI prints, ``config.ladder[0].drop_rate: must be in
[0, 1), got -0.1``: the first error, unknown keys before wrong types before bad values. Stages never import
``pipeline``, so it lives here and ``pipeline/config.py`` uses it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, ConfigDict, Strict, ValidationError
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

T = TypeVar("T")


def _many(value: Any) -> Any:
    if isinstance(value, (str, int, float)) or value is None:
        return (value,)  # a single path or number where a list is expected
    return tuple(value) if isinstance(value, list) else value


Many = Annotated[tuple[T, ...], Strict(), BeforeValidator(_many)]


class _Late:
    def __repr__(self) -> str:
        return "LATE"


LATE = _Late()


def identity_tree(obj: Any) -> Any:
    """``obj`` (a config dataclass, nested) as plain data, without ``LATE`` fields that hold their default."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        infos = getattr(type(obj), "__pydantic_fields__", {})
        tree = {}
        for f in dataclasses.fields(obj):
            value, info = getattr(obj, f.name), infos.get(f.name)
            if info is not None and LATE in info.metadata and value == info.get_default(call_default_factory=True):
                continue
            tree[f.name] = identity_tree(value)
        return tree
    if isinstance(obj, (list, tuple)):
        return [identity_tree(v) for v in obj]
    return obj


def config(cls: type[T]) -> type[T]:
    """``cls`` as a frozen pydantic dataclass whose bad values are one ``ValueError`` line naming the field."""
    cls = dataclass(frozen=True, config=ConfigDict(extra="forbid", validate_default=True))(cls)
    validate = cls.__init__

    @functools.wraps(validate)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            validate(self, *args, **kwargs)
        except ValidationError as exc:
            raise ValueError(one_line(exc, type(self))) from exc

    cls.__init__ = __init__
    return cls


_TYPES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool"}
_RANK = {"unexpected_keyword_argument": 0, "invalid_key": 0, "tuple_type": 1, "dataclass_type": 1}
_OPS = {"Ge": ">=", "Gt": ">", "Le": "<=", "Lt": "<"}
_RULES = ("literal_error", "greater_than", "greater_than_equal", "less_than", "less_than_equal")


def one_line(exc: ValidationError, root: type, prefix: str = "") -> str:
    """The first error (unknown keys before wrong types before bad values) as ``prefix.a.b[0].c: message``."""
    err = min(exc.errors(), key=lambda e: _RANK.get(e["type"], 1 if e["type"] in _TYPES else 2))
    kind, value, ctx = err["type"], err["input"], err.get("ctx") or {}
    where, tp, owner, info = prefix, root, root, None
    for key in err["loc"]:  # walk the types along the path: the field's constraints word the message
        fields = getattr(tp, "__pydantic_fields__", None)
        if fields is not None:
            where, owner, info = f"{where}.{key}", tp, fields.get(key)
            tp = info.annotation if info else None
        else:  # an entry of a tuple
            where, info = f"{where}[{key}]", None
            tp = next(iter(typing.get_args(tp)), None)
    where = where.lstrip(".")
    if kind == "value_error":  # a model validator's "field: why", about the dataclass at `where`
        return f"{where}.{ctx['error']}".lstrip(".")
    if kind in ("unexpected_keyword_argument", "invalid_key"):
        names = list(owner.__pydantic_fields__)
        close = difflib.get_close_matches(str(err["loc"][-1]), names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(sorted(names))}"
        return f"{where}: unknown key; {hint}"
    expected = _TYPES.get(kind)
    if kind == "literal_error" and info is not None:
        allowed = typing.get_args(info.annotation)
        if type(value) is not type(allowed[0]):  # not a choice at all: worded as a wrong type
            expected = type(allowed[0]).__name__
    if expected:
        return f"{where}: expected {expected}, got {type(value).__name__} {value!r}"
    if kind == "tuple_type":
        return f"{where}: expected a list, got {type(value).__name__}"
    if kind == "dataclass_type":
        return f"{where}: expected a mapping of {ctx['class_name']} fields, got {type(value).__name__}"
    if kind == "too_short" and info is not None:  # the description names one entry
        return f"{where}: give at least one {info.description or 'value'}"
    if info is not None and kind in _RULES:
        if info.annotation is float and isinstance(value, int):
            value = float(value)  # as the field holds it
        hint = f" ({info.description})" if info.description else ""
        return f"{where}: must be {_rule(info)}{hint}, got {value!r}"
    return f"{where}: {err['msg']}"


def _rule(info: FieldInfo) -> str:
    """``one of a, b``, ``in [0, 1)`` or ``>= 1``: the field's Literal values or its bounds."""
    if typing.get_origin(info.annotation) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(info.annotation)))
    bounds = {type(c).__name__: dataclasses.astuple(c)[0] for c in info.metadata if type(c).__name__ in _OPS}
    if len(bounds) == 2:
        (low, a), (high, b) = sorted(bounds.items(), key=lambda kv: kv[0].startswith("L"))
        return f"in {'[' if low == 'Ge' else '('}{_num(a)}, {_num(b)}{']' if high == 'Le' else ')'}"
    ((op, bound),) = bounds.items()
    return f"{_OPS[op]} {_num(bound)}"


def _num(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)
