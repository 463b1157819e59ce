"""FHIR JSON primitive types, checked strictly.

fhir.resources coerces on the way in (it takes the string "true" for a boolean and "2" for an
integer); FHIR JSON does not allow that, and a receiver that trusts the coercion reads data
the sender never wrote. This walks a resource against the element types the models declare.
"""

from __future__ import annotations

import datetime as dt
import types
import typing
from decimal import Decimal
from functools import lru_cache
from typing import Any

# kind: "bool" | "int" | "decimal" | "str" | "object" | "resource" | "any"
ElementSpec = tuple[str, bool, Any]  # (kind, is a list, model class for objects)
TypeProblem = tuple[str, str, str]  # (diagnostics, issue code, expression)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            rest = [a for a in args if a is not type(None)]
            annotation = rest[0] if len(rest) == 1 else Any
        elif origin in (list, typing.List):  # noqa: UP006 - fhir.resources uses typing.List
            is_list, annotation = True, args[0]
        elif origin is typing.Annotated:
            annotation = args[0]
        else:
            return annotation, is_list


def _spec(annotation: Any) -> ElementSpec:
    base, is_list = _unwrap(annotation)
    if base is bool:
        return "bool", is_list, None
    if base is int:
        return "int", is_list, None
    if base in (Decimal, float):
        return "decimal", is_list, None
    if base in (str, dt.date, dt.datetime, dt.time, bytes):
        return "str", is_list, None
    getter = getattr(base, "get_model_klass", None)
    if getter is not None:
        model = getter()
        if getattr(model, "__resource_type__", None) in ("Resource", "DomainResource"):
            return "resource", is_list, None
        return "object", is_list, model
    return "any", is_list, None


@lru_cache(maxsize=1024)
def element_specs(model: Any) -> dict[str, ElementSpec]:
    specs: dict[str, ElementSpec] = {}
    for name, field in model.model_fields.items():
        specs[field.alias or name] = _spec(field.annotation)
    return specs


_JSON_KIND = {
    "bool": "a JSON boolean",
    "int": "a JSON integer",
    "decimal": "a JSON number",
    "str": "a JSON string",
    "object": "a JSON object",
    "resource": "a resource",
}


def _ok(kind: str, value: Any) -> bool:
    t = type(value)
    if kind == "bool":
        return t is bool
    if kind == "int":
        return t is int
    if kind == "decimal":
        return t in (int, float)
    if kind == "str":
        return t is str
    if kind in ("object", "resource"):
        return t is dict
    return True


def check_types(
    doc: dict[str, Any], model: Any, where: str, resource_model: Any
) -> list[TypeProblem]:
    """Issues for every element whose JSON type is not the one FHIR declares."""
    issues: list[TypeProblem] = []
    specs = element_specs(model)
    for key, value in doc.items():
        if key == "resourceType" or key.startswith("_"):
            continue
        spec = specs.get(key)
        if spec is None:
            continue  # unknown elements are the model's to report
        kind, is_list, child = spec
        path = f"{where}{key}"
        if is_list != (type(value) is list):
            shape = "an array" if is_list else "a single value"
            issues.append((f"{path} must be {shape}", "structure", path))
            continue
        for i, item in enumerate(value if is_list else (value,)):
            at = f"{path}[{i}]" if is_list else path
            if not _ok(kind, item):
                issues.append(
                    (
                        f"{at} must be {_JSON_KIND.get(kind, kind)}, not "
                        f"{type(item).__name__} {str(item)[:40]!r}",
                        "value",
                        at,
                    )
                )
            elif kind == "object":
                issues.extend(check_types(item, child, f"{at}.", resource_model))
            elif kind == "resource" and isinstance(item.get("resourceType"), str):
                try:
                    inner = resource_model(item["resourceType"])
                except Exception:
                    continue  # an unknown type is reported by the caller
                issues.extend(check_types(item, inner, f"{at}.", resource_model))
        if len(issues) >= 20:
            break
    return issues
