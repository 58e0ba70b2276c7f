"""Typed reading of artifact JSON: every malformed field is a one-line LipdetError that names it.

:class:`Fields` wraps one JSON object of an artifact (a model card, a plan sidecar, or an object
nested in one) and hands out its fields checked against the type the reader expects. Field
names in errors are dotted paths from the artifact's top (``lipschitz.per_scale[2].loc``).
:func:`rows_from` and :func:`row_to_dict` read and write flat row dataclasses (numbers and
strings) from their own field declarations, so adding an optional field to a row needs no
reader change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, TypeVar

import lipdet
from lipdet.errors import LipdetError

T = TypeVar("T")
_REQUIRED: Any = object()

_KIND_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "an object",
               list: "a list"}
_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings", dict: "objects"}


def _is(value: Any, kind: type) -> bool:
    """``isinstance`` for JSON values: an int is a number, a bool is neither an int nor a number."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


class Fields:
    """Checked access to the fields of one JSON object of an artifact.

    Args:
        obj: the decoded JSON object (anything else is refused, naming ``where``).
        what: the artifact's name in errors (``"model card"``, ``"plan sidecar"``).
        source: where it came from (a path), the start of every error.
        where: dotted path of ``obj`` inside the artifact, ``""`` at the top.
    """

    def __init__(self, obj: Any, what: str, source: str, where: str = "") -> None:
        self.what, self.source, self.where = what, source, where
        if not isinstance(obj, dict):
            raise self.error(f"should be an object, got {type(obj).__name__}")
        self.obj: dict[str, Any] = obj

    def name(self, key: str) -> str:
        """The dotted path of ``key`` in the artifact."""
        return f"{self.where}.{key}" if self.where else key

    def error(self, text: str, key: str | None = None) -> LipdetError:
        """A one-line LipdetError about ``key`` (or about this object itself)."""
        field = self.name(key) if key is not None else (self.where or "top level")
        return LipdetError(f"{self.source}: {self.what} field '{field}' {text}")

    def has(self, key: str) -> bool:
        """True if ``key`` is present and not null."""
        return self.obj.get(key) is not None

    def get(self, key: str, kind: type[T], default: Any = _REQUIRED) -> T:
        """Field ``key`` as ``kind`` (float accepts integers); ``default`` when absent or null, if given."""
        value = self.obj.get(key)
        if value is None:
            if default is _REQUIRED:
                raise self.error("is missing", key)
            return default
        if not _is(value, kind):
            raise self.error(f"should be {_KIND_NAMES.get(kind, kind.__name__)}, got {_json_type(value)}", key)
        return float(value) if kind is float else value  # type: ignore[return-value]

    def sub(self, key: str, required: bool = True) -> Optional["Fields"]:
        """The object at ``key`` as :class:`Fields`; None when absent (or null) and not ``required``."""
        if not required and not self.has(key):
            return None
        return Fields(self.get(key, dict), self.what, self.source, self.name(key))

    def items(self, key: str, kind: type[T], default: Any = _REQUIRED) -> tuple[T, ...]:
        """The list at ``key``, each element checked as ``kind``."""
        values = self.get(key, list, default)
        if values is default and default is not _REQUIRED:
            return default
        for i, v in enumerate(values):
            if not _is(v, kind):
                raise self.error(f"should hold only {_PLURALS.get(kind, kind.__name__)}, item {i} is {_json_type(v)}",
                                 key)
        return tuple(float(v) if kind is float else v for v in values)

    def objects(self, key: str, default: Any = _REQUIRED) -> list["Fields"]:
        """The list of objects at ``key``, each as :class:`Fields` (``key[i]`` in errors)."""
        values = self.get(key, list, default)
        if values is default and default is not _REQUIRED:
            return default
        return [Fields(v, self.what, self.source, f"{self.name(key)}[{i}]") for i, v in enumerate(values)]


def _json_type(value: Any) -> str:
    """How a JSON value's type reads in an error (``an integer``, ``a string``...)."""
    return _KIND_NAMES.get(type(value), type(value).__name__)


_ROW_KINDS: dict[str, type] = {"float": float, "int": int, "str": str, "bool": bool}


def _row_kind(annotation: Any) -> tuple[type, bool]:
    """``(kind, optional)`` of a row field annotation such as ``float`` or ``float | None``."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.replace("Optional[", "").rstrip("]").split("|")]
    optional = "None" in parts or text.startswith("Optional[")
    kinds = [p for p in parts if p != "None"]
    if len(kinds) != 1 or kinds[0] not in _ROW_KINDS:
        raise TypeError(f"row field type {text!r} is not one of {sorted(_ROW_KINDS)} (optionally | None)")
    return _ROW_KINDS[kinds[0]], optional


def row_from(cls: type[T], fields: Fields) -> T:
    """An instance of the flat row dataclass ``cls`` from ``fields``, each field checked by its annotation.

    A field with a default may be absent; one annotated ``X | None`` may be null.
    """
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind, optional = _row_kind(f.type)
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else _REQUIRED
        if not fields.has(f.name) and (has_default or optional):
            values[f.name] = None if default is _REQUIRED else default
            continue
        values[f.name] = fields.get(f.name, kind)
    return cls(**values)


def rows_from(cls: type[T], fields: list[Fields]) -> tuple[T, ...]:
    """:func:`row_from` for a list of objects."""
    return tuple(row_from(cls, f) for f in fields)


def row_to_dict(row: Any) -> dict[str, Any]:
    """A flat row dataclass as a JSON object; optional fields that are None are left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(row):
        value = getattr(row, f.name)
        if value is None and _row_kind(f.type)[1]:
            continue
        out[f.name] = value
    return out



def check_version(version: Any, known: tuple[int, ...], what: str, source: str, writer: Any) -> None:
    """One-line refusal of an artifact version this lipdet cannot read (``known``: the versions it reads)."""
    if version not in known:
        by = f" (written by lipdet {writer})" if writer else ""
        raise LipdetError(f"{source}: {what} version {version!r}{by} is not one this lipdet {lipdet.__version__} "
                          f"reads ({', '.join(map(str, known))}); upgrade lipdet or re-export the model")
