"""Writes for accounts, tokens and teams. Each records its audit event inside its own transaction."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Group
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.http import HttpRequest
from django.utils import timezone

from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record, target_of
from portal.models import ApiToken, AuditOutcome, Membership, Team
from portal.roles import ADMIN, APPROVER, ROLES, roles_of
from portal.tokens import generate_token, hash_token

User = get_user_model()


def _user_target(user: Any) -> Target:
    return Target(type="user", id=str(user.pk), repr=user.get_username())


# --- Sessions ---------------------------------------------------------------------------------------------------

def session_login(*, request: HttpRequest, user: AbstractBaseUser) -> None:
    with transaction.atomic():
        audit_record(AuditAction.AUTH_LOGIN, actor=user, target=_user_target(user))


def session_login_failed(*, username: str) -> None:
    with transaction.atomic():
        audit_record(
            AuditAction.AUTH_LOGIN_FAILED,
            actor=None,
            actor_username=username[:150],
            outcome=AuditOutcome.FAILURE,
            metadata={"reason": "wrong username or password"},
        )


def session_locked_out(*, username: str) -> None:
    with transaction.atomic():
        audit_record(
            AuditAction.AUTH_LOCKED_OUT,
            actor=None,
            actor_username=username[:150],
            outcome=AuditOutcome.DENIED,
            metadata={"reason": "too many failed sign-ins"},
        )


def session_logout(*, request: HttpRequest, user: AbstractBaseUser) -> None:
    with transaction.atomic():
        audit_record(AuditAction.AUTH_LOGOUT, actor=user, target=_user_target(user))


def session_expire(*, request: HttpRequest, user: AbstractBaseUser, idle_seconds: int) -> None:
    with transaction.atomic():
        audit_record(
            AuditAction.AUTH_SESSION_EXPIRED,
            actor=user,
            target=_user_target(user),
            metadata={"idle_seconds": idle_seconds},
        )


# --- Re-authentication ------------------------------------------------------------------------------------------

class ReauthenticationFailed(PermissionDenied):
    """A sensitive step needs the person's password again, and it was missing or wrong."""


def reauthenticate(*, actor: Any, password: str, request: HttpRequest | None, purpose: str, what: str,
                   target: Target | None = None) -> None:
    """Check ``actor``'s password for a sensitive step (``what``, e.g. "Approving a promotion to prod"). With a
    request, through the sign-in's own backends, so wrong guesses count towards the same lockout (django-axes) as
    wrong sign-ins. A missing or wrong password is audited (``auth.reauth_failed``) and raises
    ReauthenticationFailed."""
    locked = False
    if not password:
        ok = False
    elif request is not None:
        from django.contrib.auth import authenticate

        user = authenticate(request, username=actor.get_username(), password=password)
        ok = user is not None and user.pk == actor.pk
        locked = bool(getattr(request, "axes_locked_out", False))
    else:  # called from code, not from a person's request
        ok = actor.check_password(password)
    if ok:
        return
    audit_record(AuditAction.AUTH_REAUTH_FAILED, actor=actor, target=target or _user_target(actor),
                 outcome=AuditOutcome.DENIED, metadata={"for": purpose, "locked_out": locked})
    if locked:
        raise ReauthenticationFailed("Too many wrong passwords: your account is locked for a while. Ask an "
                                     "administrator if you need it sooner.")
    raise ReauthenticationFailed(f"{what} needs your password, and the one given is not right." if password
                                 else f"{what} needs your password.")


# --- API tokens -------------------------------------------------------------------------------------------------

# Roles whose tokens can approve promotions, roll back or administer: creating one asks for the password again.
REAUTHENTICATE_FOR_TOKENS = {APPROVER, ADMIN}


def token_needs_reauthentication(user: Any) -> bool:
    return bool(user.is_superuser or REAUTHENTICATE_FOR_TOKENS & set(roles_of(user)))


def token_create_for_person(*, user: Any, name: str, expires_in_days: int | None = None, password: str = "",
                            request: HttpRequest | None = None) -> tuple[ApiToken, str]:
    """A person creating their own token from a signed-in session (the account page, or the API with the browser's
    session; never with a bearer token, which the API refuses before this). Approvers and administrators give their
    password again: a hijacked session alone must not mint a long-lived credential of those roles."""
    if token_needs_reauthentication(user):
        reauthenticate(actor=user, password=password, request=request, purpose="token.create",
                       what="Creating an API token as an approver or administrator")
    return token_create(user=user, name=name, expires_in_days=expires_in_days, actor=user)

MAX_TOKENS_PER_USER = 50


def token_create(*, user: Any, name: str, expires_in_days: int | None = None, actor: Any) -> tuple[ApiToken, str]:
    """Create a token for ``user``; returns the row and the plaintext, which is never stored or shown again."""
    name = (name or "").strip()
    if not name:
        raise ValidationError({"name": "Give the token a name, such as the pipeline that will use it."})
    if len(name) > 100:
        raise ValidationError({"name": "A token's name has at most 100 characters."})
    if expires_in_days is not None and not 1 <= expires_in_days <= 3650:
        raise ValidationError({"expires_in_days": "Choose between 1 and 3650 days, or no expiry."})
    if actor.pk != user.pk and not actor.has_perm("portal.manage_teams"):
        raise ValidationError({"user": "You may create tokens only for yourself."})
    plaintext = generate_token()
    with transaction.atomic():
        active = ApiToken.objects.select_for_update().filter(user=user, revoked_at__isnull=True).count()
        if active >= MAX_TOKENS_PER_USER:
            raise ValidationError({"name": f"You have {active} active tokens; revoke some before creating more."})
        token = ApiToken.objects.create(
            user=user,
            name=name,
            prefix=plaintext[:12],
            key_hash=hash_token(plaintext),
            expires_at=timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None,
        )
        audit_record(
            AuditAction.TOKEN_CREATE,
            actor=actor,
            target=target_of(token),
            after={"name": token.name, "prefix": token.prefix, "user": user.get_username(),
                   "expires_at": token.expires_at.isoformat() if token.expires_at else None},
        )
    return token, plaintext


def token_revoke(*, token: ApiToken, actor: Any) -> ApiToken:
    with transaction.atomic():
        locked = ApiToken.objects.select_for_update().get(pk=token.pk)
        if locked.revoked_at is not None:
            return locked
        locked.revoked_at = timezone.now()
        locked.save(update_fields=["revoked_at"])
        audit_record(
            AuditAction.TOKEN_REVOKE,
            actor=actor,
            target=target_of(locked),
            before={"revoked_at": None},
            after={"revoked_at": locked.revoked_at.isoformat()},
        )
    return locked


# --- Teams and users --------------------------------------------------------------------------------------------

def team_create(*, slug: str, name: str, description: str = "", actor: Any) -> Team:
    with transaction.atomic():
        team = Team(slug=slug, name=name, description=description)
        team.full_clean()
        team.save()
        audit_record(AuditAction.TEAM_CREATE, actor=actor, target=target_of(team, team_slug=team.slug),
                     after={"slug": slug, "name": name})
    return team


def membership_add(*, team: Team, user: Any, actor: Any) -> Membership:
    with transaction.atomic():
        membership, created = Membership.objects.get_or_create(team=team, user=user)
        if created:
            audit_record(AuditAction.TEAM_MEMBER_ADD, actor=actor, target=target_of(team, team_slug=team.slug),
                         after={"user": user.get_username()})
    return membership


def user_create(*, username: str, password: str, email: str = "", actor: Any, validate_password: bool = True) -> Any:
    from django.contrib.auth.password_validation import validate_password as check_password

    with transaction.atomic():
        user = User(username=username, email=email)
        if validate_password:
            check_password(password, user)
        user.set_password(password)
        user.full_clean()
        user.save()
        audit_record(AuditAction.USER_CREATE, actor=actor, target=_user_target(user), after={"username": username})
    return user


def user_set_roles(*, user: Any, roles: list[str], actor: Any) -> None:
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValidationError({"roles": f"Unknown roles: {', '.join(unknown)}. Known: {', '.join(sorted(ROLES))}."})
    with transaction.atomic():
        before = sorted(user.groups.values_list("name", flat=True))
        if before == sorted(roles):
            return
        user.groups.set(Group.objects.filter(name__in=roles))
        audit_record(AuditAction.USER_ROLE_CHANGE, actor=actor, target=_user_target(user),
                     before={"roles": before}, after={"roles": sorted(roles)})
