"""``authorization.k8s.io/v1`` SubjectAccessReviews, answered from rules a test sets.

The real server asks its authorizers (RBAC) and answers with the posted review
plus ``status.allowed``; nothing is stored. Here the rules are
``Authorizer.allow(user, verb, group, resource, name=, namespace=)``: a review
is allowed when one rule matches it, and denied otherwise (there is no deny
rule, as in RBAC).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from tests.doubles.kubeapi._objects import (
    SUBJECT_ACCESS_REVIEWS,
    ApiError,
    Cause,
    JsonObject,
    timestamp,
)


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One grant. ``"*"`` matches any user, verb, group or resource; ``None`` any name or
    namespace. ``resource`` may name a subresource as ``pods/exec``."""

    user: str
    verb: str
    group: str
    resource: str
    name: str | None = None
    namespace: str | None = None

    def matches(self, user: str, attributes: JsonObject) -> bool:
        """Whether this rule grants ``attributes`` (a ``resourceAttributes``) to ``user``."""
        resource = attributes.get("resource", "")
        if attributes.get("subresource"):
            resource = f"{resource}/{attributes['subresource']}"
        return (
            self.user in ("*", user)
            and self.verb in ("*", attributes.get("verb", ""))
            and self.group in ("*", attributes.get("group", ""))
            and self.resource in ("*", resource)
            and self.name in (None, attributes.get("name", ""))
            and self.namespace in (None, attributes.get("namespace", ""))
        )

    def describe(self) -> str:
        """The rule in words, for ``status.reason``."""
        what = f"{self.resource}.{self.group}" if self.group else self.resource
        where = f" in namespace {self.namespace!r}" if self.namespace is not None else ""
        named = f" named {self.name!r}" if self.name is not None else ""
        return f"{self.verb} on {what}{named}{where} for {self.user}"


class Authorizer:
    """The rules, and every review answered (in arrival order)."""

    def __init__(self) -> None:
        self.rules: list[AccessRule] = []
        self.reviews: list[JsonObject] = []
        """Every SubjectAccessReview answered, with its status (refused ones are not here)."""

    def allow(self, rule: AccessRule) -> None:
        """Grant what ``rule`` names from now on."""
        self.rules.append(rule)

    def review(self, body: Any) -> JsonObject:
        """Answer a posted review: the review with ``status.allowed`` and a reason."""
        spec = body.get("spec") if isinstance(body, dict) else None
        if not isinstance(spec, dict):
            spec = {}
        causes: list[Cause] = []
        user = spec.get("user") or ""
        if not user and not spec.get("groups"):
            causes.append(
                Cause(
                    "spec.user",
                    "FieldValueInvalid",
                    'Invalid value: "": at least one of user or group must be specified',
                )
            )
        attributes = spec.get("resourceAttributes")
        if (attributes is None) == (spec.get("nonResourceAttributes") is None):
            causes.append(
                Cause(
                    "spec.resourceAttributes",
                    "FieldValueInvalid",
                    "Invalid value: exactly one of nonResourceAttributes or resourceAttributes "
                    "must be specified",
                )
            )
        if causes:
            raise ApiError.invalid(SUBJECT_ACCESS_REVIEWS, "", causes)
        answer: JsonObject = copy.deepcopy(body)
        answer["apiVersion"] = SUBJECT_ACCESS_REVIEWS.api_version
        answer["kind"] = SUBJECT_ACCESS_REVIEWS.kind
        answer["metadata"] = {**(answer.get("metadata") or {}), "creationTimestamp": timestamp()}
        granted = next(
            (r for r in self.rules if isinstance(attributes, dict) and r.matches(user, attributes)),
            None,
        )
        if granted is not None:
            answer["status"] = {"allowed": True, "reason": f"allowed by rule: {granted.describe()}"}
        else:
            answer["status"] = {
                "allowed": False,
                "reason": f"no rule allows this request to user {user!r}",
            }
        self.reviews.append(answer)
        return answer
