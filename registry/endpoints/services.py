"""Multi-model endpoints: create one, replace its routing rules and default, delete it; each change audited in its
own transaction and announced to serving workers by the endpoint's ``generation``.

Who may change an endpoint follows who may change what serves in its environment: in ``dev`` those who deploy
there (``deploy_dev``: data scientists), in ``stage`` and ``prod`` team managers (``manage_teams``), since a rule
there moves live traffic between versions that were approved one by one. Everyone in the team reads it.

A rule may only name a model of the endpoint's own team that is deployed in the endpoint's environment (something
serves it there now); anything else is refused with a ``ValidationError`` naming the rule (a 400), and nothing is
written. A model that stops being served later is not refused retroactively: its rows answer 404 ``not_deployed``
at scoring time, as its own route does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.models import Team
from portal.permissions import require_capability
from registry.models import (
    MODEL_NAME_VALIDATOR,
    Endpoint,
    EndpointRule,
    Environment,
    EnvironmentState,
    RegisteredModel,
    RuleKind,
)
from registry.serving.endpoints import normalise as normalise_value

MAX_RULES = 100
MAX_VALUES = 1000
MAX_VALUE_CHARS = 200
HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,100}")
FIELD_NAME_CHARS = 200


def edit_capability(environment: str) -> str:
    """The capability that changes an endpoint in ``environment``."""
    return "deploy_dev" if environment == Environment.DEV else "manage_teams"


@dataclass(frozen=True)
class RuleInput:
    """A rule as a caller writes it: the model by name."""

    kind: str
    model: str
    key: str = ""
    values: tuple[Any, ...] = ()
    percent: int | None = None


def endpoint_target(endpoint: Endpoint) -> Target:
    return Target(type="endpoint", id=str(endpoint.uid), repr=str(endpoint)[:255], team_slug=endpoint.team.slug)


def endpoint_summary(endpoint: Endpoint) -> dict[str, Any]:
    """What the audit trail keeps of an endpoint: its default and its rules in order, models by name."""
    rules = list(endpoint.rules.select_related("model").order_by("position"))
    return {
        "name": endpoint.name, "environment": endpoint.environment, "team": endpoint.team.slug,
        "default": endpoint.default_model.name if endpoint.default_model else None,
        "description": endpoint.description, "generation": endpoint.generation,
        "rules": [rule_summary(r) for r in rules],
    }


def rule_summary(rule: EndpointRule) -> dict[str, Any]:
    item: dict[str, Any] = {"kind": rule.kind, "model": rule.model.name}
    if rule.kind == RuleKind.SHARE:
        item["percent"] = rule.percent
    else:
        item["key"] = rule.key
        item["values"] = list(rule.values)
    return item


def _served_model(team: Team, environment: str, name: Any, where: str) -> RegisteredModel:
    """The team's model ``name``, deployed in ``environment``; else a 400 naming ``where`` it was asked for. A model
    of another team is reported as not one of this team's, whether or not the caller could see it."""
    if not isinstance(name, str) or not name.strip():
        raise ValidationError({where: "Name a model."})
    model = RegisteredModel.objects.filter(name=name.strip(), team=team).first()
    if model is None:
        raise ValidationError({where: f"Team {team.slug} has no model named {name.strip()[:100]!r}: an endpoint "
                                      "routes only to its own team's models."})
    served = EnvironmentState.objects.filter(model=model, environment=environment,
                                             champion__isnull=False).exists()
    if not served:
        raise ValidationError({where: f"{model.name} is not deployed in {environment}: deploy it there before an "
                                      "endpoint routes to it."})
    return model


def _checked_rules(team: Team, environment: str, rules: list[RuleInput]) -> list[EndpointRule]:
    if len(rules) > MAX_RULES:
        raise ValidationError({"rules": f"At most {MAX_RULES} rules an endpoint, not {len(rules)}."})
    checked: list[EndpointRule] = []
    share_total = 0
    for i, rule in enumerate(rules):
        where = f"rules[{i}]"
        if rule.kind not in RuleKind.values:
            raise ValidationError({where: f"Unknown rule kind {str(rule.kind)[:40]!r}: use "
                                          f"{', '.join(RuleKind.values)}."})
        model = _served_model(team, environment, rule.model, where)
        key, values, percent = (rule.key or "").strip(), list(rule.values or ()), None
        if rule.kind == RuleKind.SHARE:
            if not isinstance(rule.percent, int) or isinstance(rule.percent, bool) or not 1 <= rule.percent <= 100:
                raise ValidationError({where: "A share rule takes percent, a whole number from 1 to 100."})
            share_total += rule.percent
            if share_total > 100:
                raise ValidationError({where: f"Share rules add up to {share_total}% of traffic; at most 100%."})
            key, values, percent = "", [], rule.percent
        else:
            if rule.kind == RuleKind.HEADER_EQUALS:
                if not HEADER_NAME.fullmatch(key):
                    raise ValidationError({where: "Name the header (letters, digits and hyphens), e.g. X-Region."})
            elif not key or len(key) > FIELD_NAME_CHARS:
                raise ValidationError({where: "Name the field (an input column of the request's rows)."})
            if not values or (rule.kind != RuleKind.FIELD_IN and len(values) != 1):
                raise ValidationError({where: "Give one value to compare with." if rule.kind != RuleKind.FIELD_IN
                                       else "Give the values the field may take."})
            if len(values) > MAX_VALUES:
                raise ValidationError({where: f"At most {MAX_VALUES} values a rule."})
            for value in values:
                if not isinstance(value, (str, int, float, bool)) or len(str(value)) > MAX_VALUE_CHARS:
                    raise ValidationError({where: f"Values are text or numbers of at most {MAX_VALUE_CHARS} "
                                                  "characters."})
            values = [v if isinstance(v, str) else normalise_value(v) for v in values]
        checked.append(EndpointRule(position=i, kind=rule.kind, key=key, values=values, percent=percent,
                                    model=model))
    return checked


def endpoint_create(*, team: Team, name: str, environment: str, default_model: str, actor: Any,
                    rules: list[RuleInput] | None = None, description: str = "") -> Endpoint:
    if environment not in Environment.values:
        raise ValidationError({"environment": f"Unknown environment {str(environment)[:20]!r}: use dev, stage or "
                                              "prod."})
    require_capability(actor, edit_capability(environment))
    name = (name or "").strip()
    try:
        MODEL_NAME_VALIDATOR(name)
    except ValidationError as exc:
        raise ValidationError({"name": exc.messages}) from None
    default = _served_model(team, environment, default_model, "default")
    checked = _checked_rules(team, environment, rules or [])
    try:
        with transaction.atomic():
            endpoint = Endpoint.objects.create(name=name, environment=environment, team=team, created_by=actor,
                                               default_model=default, description=(description or "")[:2000])
            for rule in checked:
                rule.endpoint = endpoint
            EndpointRule.objects.bulk_create(checked)
            audit_record(AuditAction.ENDPOINT_CREATE, actor=actor, target=endpoint_target(endpoint),
                         after=endpoint_summary(endpoint))
    except IntegrityError:
        raise ValidationError({"name": f"There is already an endpoint named {name} in {environment}."}) from None
    return endpoint


def endpoint_update(*, endpoint: Endpoint, actor: Any, rules: list[RuleInput] | None = None,
                    default_model: str | None = None, description: str | None = None) -> Endpoint:
    """Replace the rules (when given, as a whole, in order), the default and the description. Serving workers
    pick the change up within ``registry.serving.endpoints.REFRESH_SECONDS``, without a restart."""
    require_capability(actor, edit_capability(endpoint.environment))
    default = (_served_model(endpoint.team, endpoint.environment, default_model, "default")
               if default_model is not None else None)
    checked = _checked_rules(endpoint.team, endpoint.environment, rules) if rules is not None else None
    with transaction.atomic():
        endpoint = (Endpoint.objects.select_for_update(of=("self",)).select_related("team", "default_model")
                    .get(pk=endpoint.pk))
        before = endpoint_summary(endpoint)
        if default is not None:
            endpoint.default_model = default
        if description is not None:
            endpoint.description = description[:2000]
        if checked is not None:
            endpoint.rules.all().delete()
            for rule in checked:
                rule.endpoint = endpoint
            EndpointRule.objects.bulk_create(checked)
        endpoint.updated_at = timezone.now()
        endpoint.save(update_fields=["default_model", "description", "updated_at"])
        Endpoint.objects.filter(pk=endpoint.pk).update(generation=F("generation") + 1)
        endpoint.refresh_from_db(fields=["generation"])
        audit_record(AuditAction.ENDPOINT_CHANGE, actor=actor, target=endpoint_target(endpoint), before=before,
                     after=endpoint_summary(endpoint))
    return endpoint


def endpoint_delete(*, endpoint: Endpoint, actor: Any) -> None:
    require_capability(actor, edit_capability(endpoint.environment))
    with transaction.atomic():
        audit_record(AuditAction.ENDPOINT_DELETE, actor=actor, target=endpoint_target(endpoint),
                     before=endpoint_summary(endpoint))
        endpoint.delete()


def rules_from_data(items: Any) -> list[RuleInput]:
    """Rules as the API and the page send them (a list of objects); a clear 400 for anything else."""
    if not isinstance(items, list):
        raise ValidationError({"rules": "Send rules as a list of objects."})
    rules = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValidationError({f"rules[{i}]": "Each rule is an object: kind, model, and key and values or "
                                                  "percent."})
        unknown = set(item) - {"kind", "model", "key", "values", "percent"}
        if unknown:
            raise ValidationError({f"rules[{i}]": f"Unknown field {sorted(unknown)[0][:40]!r}."})
        values = item.get("values", [])
        if not isinstance(values, list):
            raise ValidationError({f"rules[{i}]": "values is a list."})
        percent = item.get("percent")
        rules.append(RuleInput(kind=str(item.get("kind", "")), model=item.get("model", ""),
                               key=str(item.get("key") or ""), values=tuple(values), percent=percent))
    return rules
