"""SMART App Launch scopes, the grammar HDX's access tokens carry (a pure module).

v2 resource scopes are ``<context>/<resource>.<permissions>``: the context is ``system``
(backend services; ``user`` and ``patient`` parse but HDX grants only ``system``), the
resource a FHIR type or ``*``, the permissions a subsequence of ``cruds`` in that order
(create, read, update, delete, search). v1's ``.read`` (= ``rs``), ``.write`` (= ``cud``) and
``.*`` (= ``cruds``) are accepted and mean the same. SMART v2's query parameters on a scope
(``system/Observation.rs?category=…``) are not supported: such a scope is refused, never
silently widened.

Anything else of the form ``system/<name>`` whose name is not a FHIR type (lower case:
``system/hdx-admin``, ``system/hdx-identity``) is an HDX scope, granted or not as a whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

PERMISSIONS = "cruds"
V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}
CONTEXTS = ("system", "user", "patient")
_RESOURCE_SCOPE = re.compile(r"^(system|user|patient)/(\*|[A-Z][A-Za-z]{1,63})\.([A-Za-z*]+)$")
_HDX_SCOPE = re.compile(r"^system/[a-z][a-z0-9\-]{1,63}$")


class ScopeError(ValueError):
    """A scope that does not parse."""


@dataclass(frozen=True, slots=True)
class ResourceScope:
    context: str
    resource: str  # a FHIR resource type, or "*"
    permissions: str  # a subsequence of "cruds"

    def grants(self, resource: str, permission: str) -> bool:
        return (
            self.context == "system"
            and self.resource in ("*", resource)
            and permission in self.permissions
        )

    def __str__(self) -> str:
        return f"{self.context}/{self.resource}.{self.permissions}"


Scope = ResourceScope | str  # a str is an HDX scope such as "system/hdx-admin"


def _permissions(text: str, scope: str) -> str:
    if text in V1_PERMISSIONS:
        return V1_PERMISSIONS[text]
    letters = iter(PERMISSIONS)
    # A subsequence of "cruds": each letter at most once, in that order.
    if not text or not all(ch in letters for ch in text):
        raise ScopeError(
            f"'{scope}': permissions must be some of c, r, u, d, s in that order "
            "(or v1's read, write, *)"
        )
    return text


def parse_scope(text: str) -> Scope:
    if "?" in text:
        raise ScopeError(f"'{text}': scopes with query parameters are not supported")
    if m := _RESOURCE_SCOPE.match(text):
        return ResourceScope(m[1], m[2], _permissions(m[3], text))
    if _HDX_SCOPE.match(text):
        return text
    raise ScopeError(f"'{text}' is not a SMART scope (system/<type or *>.<cruds>)")


def _intersect(a: Scope, b: Scope) -> Scope | None:
    if isinstance(a, str) or isinstance(b, str):
        return a if a == b else None
    same_resource = a.resource == b.resource or "*" in (a.resource, b.resource)
    if a.context != b.context or not same_resource:
        return None
    permissions = "".join(p for p in PERMISSIONS if p in a.permissions and p in b.permissions)
    if not permissions:
        return None
    resource = b.resource if a.resource == "*" else a.resource
    return ResourceScope(a.context, resource, permissions)


@dataclass(frozen=True)
class ScopeSet:
    """The scopes of a client or a token."""

    scopes: tuple[Scope, ...] = ()

    @classmethod
    def parse(cls, text: str | Iterable[str]) -> ScopeSet:
        """Space-separated scopes (or an iterable of them); ScopeError names the bad one."""
        items = text.split() if isinstance(text, str) else list(text)
        return cls(tuple(dict.fromkeys(parse_scope(s) for s in items)))

    def __iter__(self) -> Iterator[Scope]:
        return iter(self.scopes)

    def __bool__(self) -> bool:
        return bool(self.scopes)

    def __str__(self) -> str:
        return " ".join(str(s) for s in self.scopes)

    def allows(self, resource: str, permission: str) -> bool:
        """May the holder do `permission` (one of c r u d s) on `resource` (a FHIR type)?"""
        return any(isinstance(s, ResourceScope) and s.grants(resource, permission) for s in self)

    def has(self, scope: str) -> bool:
        """Does this set hold everything `scope` (one scope, any kind) asks for?"""
        wanted = parse_scope(scope)
        if isinstance(wanted, str):
            return wanted in self.scopes
        return wanted.context == "system" and all(
            self.allows(wanted.resource, p)
            if wanted.resource != "*"
            else any(
                isinstance(s, ResourceScope) and s.resource == "*" and s.grants("*", p)
                for s in self
            )
            for p in wanted.permissions
        )

    def narrow(self, requested: ScopeSet) -> ScopeSet:
        """What a client registered with these scopes is granted when it asks for
        `requested`: the intersection, only system scopes, never more than registered."""
        granted: list[Scope] = []
        for want in requested:
            for have in self:
                got = _intersect(want, have)
                if got is not None and (isinstance(got, str) or got.context == "system"):
                    granted.append(got)
        return ScopeSet(tuple(dict.fromkeys(granted)))
