"""Kubernetes label selectors: parse ``a=b,c!=d,e in (f,g),h,!i`` into a matcher.

The grammar is the one ``k8s.io/apimachinery/pkg/labels.Parse`` accepts for
equality- and set-based requirements (the numeric ``gt``/``lt`` operators of
node affinity are not supported). Requirements are ANDed. Keys are qualified
names (``[prefix/]name``), values are label values; both are validated, so a
selector that could never be meaningful is refused instead of matching nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from gpufleet.deviceapi.errors import InvalidError

_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]"
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(_NAME)
_LABEL_VALUE = re.compile(rf"({_NAME})?")
_TOKEN = re.compile(r"\s*(?:(==|!=|=|!|\(|\)|,)|([^\s=!(),]+))")


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label key (``[prefix/]name``), or None if it is."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return f"label key {key!r} has an invalid prefix (must be a DNS-1123 subdomain)"
    if len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return (
            f"label key {key!r} must be at most 63 characters of alphanumerics, '-', '_' or '.',"
            " starting and ending with an alphanumeric"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a valid label value, or None if it is (empty is valid)."""
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        return (
            f"label value {value!r} must be at most 63 characters of alphanumerics, '-', '_'"
            " or '.', starting and ending with an alphanumeric"
        )
    return None


class Operator(Enum):
    """A requirement's operator."""

    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"


@dataclass(frozen=True, slots=True)
class Requirement:
    """One ANDed term: ``key`` ``operator`` ``values``."""

    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a label set satisfies this term (Kubernetes semantics)."""
        op = self.operator
        if op is Operator.EXISTS:
            return self.key in labels
        if op is Operator.DOES_NOT_EXIST:
            return self.key not in labels
        value = labels.get(self.key)
        if op is Operator.EQUALS or op is Operator.IN:
            return value is not None and value in self.values
        # != and notin also match objects that lack the key, as in Kubernetes.
        return value is None or value not in self.values


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed label selector; the empty selector matches everything."""

    text: str
    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether every requirement holds for ``labels``."""
        return all(req.matches(labels) for req in self.requirements)

    @property
    def empty(self) -> bool:
        """True for the selector that matches everything."""
        return not self.requirements


def parse(text: str) -> Selector:
    """Parse a Kubernetes label selector; ``InvalidError`` naming it if it is malformed."""
    return _Parser(text).parse()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = self._tokenize(text)
        self.pos = 0

    def fail(self, why: str) -> InvalidError:
        return InvalidError(f"invalid label selector {self.text!r}: {why}")

    def _tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        pos = 0
        end = len(text.rstrip())
        while pos < end:
            match = _TOKEN.match(text, pos)
            if match is None:  # pragma: no cover - the token class covers every non-space char
                raise self.fail(f"unexpected character at offset {pos}")
            tokens.append(match.group(1) or match.group(2))
            pos = match.end()
        return tokens

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | None:
        token = self.peek()
        self.pos += 1
        return token

    def parse(self) -> Selector:
        requirements: list[Requirement] = []
        if not self.tokens:
            return Selector(self.text, ())
        while True:
            requirements.append(self.requirement())
            token = self.take()
            if token is None:
                return Selector(self.text, tuple(requirements))
            if token != ",":
                raise self.fail(f"expected ',' or the end, found {token!r}")

    def key(self) -> str:
        token = self.take()
        if token is None or token in _PUNCT:
            raise self.fail(f"expected a label key, found {token or 'the end'!r}")
        problem = label_key_problem(token)
        if problem:
            raise self.fail(problem)
        return token

    def value(self) -> str:
        token = self.peek()
        if token is None or token in {",", ")"}:
            return ""  # `a=` selects the empty value, as in Kubernetes
        self.pos += 1
        if token in _PUNCT:
            raise self.fail(f"expected a label value, found {token!r}")
        problem = label_value_problem(token)
        if problem:
            raise self.fail(problem)
        return token

    def requirement(self) -> Requirement:
        if self.peek() == "!":
            self.pos += 1
            return Requirement(self.key(), Operator.DOES_NOT_EXIST)
        key = self.key()
        op = self.peek()
        if op is None or op == ",":
            return Requirement(key, Operator.EXISTS)
        self.pos += 1
        if op in {"=", "=="}:
            return Requirement(key, Operator.EQUALS, frozenset({self.value()}))
        if op == "!=":
            return Requirement(key, Operator.NOT_EQUALS, frozenset({self.value()}))
        if op in {"in", "notin"}:
            values = self.value_set(key, op)
            return Requirement(key, Operator.IN if op == "in" else Operator.NOT_IN, values)
        raise self.fail(f"expected an operator after {key!r}, found {op!r}")

    def value_set(self, key: str, op: str) -> frozenset[str]:
        if self.take() != "(":
            raise self.fail(f"expected '(' after {key!r} {op}")
        values = {self.value()}
        while (token := self.take()) == ",":
            values.add(self.value())
        if token != ")":
            raise self.fail(f"expected ')' closing the values of {key!r} {op}")
        if values == {""} and self.tokens[self.pos - 2] == "(":
            raise self.fail(f"the value set of {key!r} {op} must not be empty")
        return frozenset(values)


_PUNCT = frozenset({"==", "!=", "=", "!", "(", ")", ","})
