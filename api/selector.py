"""Label selectors, as Kubernetes spells them: ``team=ios,tier!=free,env in (a,b),!legacy``.

A selector is parsed once into frozen requirements and then matched against a label map. Parsing
errors are :class:`SelectorError` with a message that names the offending term, so the API can
answer 400 with it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from api.models import validate_label_key, validate_label_value

Operator = Literal["=", "!=", "in", "notin", "exists", "!exists"]

_SET_RE = re.compile(r"^\s*(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*$")
_EQ_RE = re.compile(r"^\s*(?P<key>[^\s!=(),]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=(),]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(?P<neg>!?)\s*(?P<key>[^\s!=(),]+)\s*$")


class SelectorError(ValueError):
    """The selector string is malformed."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op == "=":
            return present and labels[self.key] == self.values[0]
        if self.op == "!=":
            # As in Kubernetes: a missing label satisfies "!=".
            return not present or labels[self.key] != self.values[0]
        if self.op == "in":
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(req.matches(labels) for req in self.requirements)


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    terms: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError("unbalanced ')'")
        if char == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise SelectorError("unbalanced '('")
    terms.append("".join(current))
    return terms


def _check(key: str, values: tuple[str, ...], term: str) -> None:
    try:
        validate_label_key(key)
        for value in values:
            validate_label_value(key, value)
    except ValueError as exc:
        raise SelectorError(f"in {term.strip()!r}: {exc}") from None


def parse_selector(text: str | None) -> Selector:
    """Parse a selector; an empty or missing one matches everything."""
    if text is None or not text.strip():
        return Selector()
    if len(text) > 4096:
        raise SelectorError("longer than 4096 characters")
    requirements: list[Requirement] = []
    for term in _split_terms(text):
        if not term.strip():
            raise SelectorError("empty term (two commas in a row or a trailing comma)")
        if match := _SET_RE.match(term):
            values = tuple(v.strip() for v in match["values"].split(",") if v.strip())
            if not values:
                raise SelectorError(f"in {term.strip()!r}: the value list is empty")
            _check(match["key"], values, term)
            op: Operator = "in" if match["op"] == "in" else "notin"
            requirements.append(Requirement(match["key"], op, values))
        elif match := _EQ_RE.match(term):
            value = match["value"]
            _check(match["key"], (value,), term)
            requirements.append(Requirement(match["key"], "!=" if match["op"] == "!=" else "=", (value,)))
        elif match := _EXISTS_RE.match(term):
            _check(match["key"], (), term)
            requirements.append(Requirement(match["key"], "!exists" if match["neg"] else "exists"))
        else:
            raise SelectorError(f"cannot parse {term.strip()!r}")
    return Selector(tuple(requirements))
