from __future__ import annotations

from typing import Any

from rest_framework import serializers

from portal.models import ApiToken, AuditEvent


class TokenSerializer(serializers.ModelSerializer[ApiToken]):
    id = serializers.UUIDField(source="uid", read_only=True)
    is_active = serializers.BooleanField(read_only=True)

    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created_at", "last_used_at", "expires_at", "revoked_at", "is_active"]
        read_only_fields = fields


class TokenCreateInput(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=100)
    expires_in_days = serializers.IntegerField(min_value=1, max_value=3650, required=False, allow_null=True)
    password = serializers.CharField(required=False, allow_blank=True, max_length=512, trim_whitespace=False,
                                     write_only=True, help_text="Your password; required of approvers and "
                                                                "administrators.")


class TokenCreatedSerializer(TokenSerializer):
    token = serializers.CharField(read_only=True, help_text="Shown once; store it now.")

    class Meta(TokenSerializer.Meta):
        fields = [*TokenSerializer.Meta.fields, "token"]
        read_only_fields = fields


class MeSerializer(serializers.Serializer[Any]):
    username = serializers.CharField()
    roles = serializers.ListField(child=serializers.CharField())
    teams = serializers.ListField(child=serializers.CharField())
    capabilities = serializers.ListField(child=serializers.CharField())


class AuditEventSerializer(serializers.ModelSerializer[AuditEvent]):
    actor = serializers.CharField(source="actor_username")
    target = serializers.SerializerMethodField()

    class Meta:
        model = AuditEvent
        fields = ["seq", "timestamp", "actor", "action", "action_code", "target", "before", "after", "metadata",
                  "request_id", "ip", "user_agent", "outcome", "prev_hash", "hash"]
        read_only_fields = fields

    def get_target(self, obj: AuditEvent) -> dict[str, str]:
        return {"type": obj.target_type, "id": obj.target_id, "repr": obj.target_repr, "team": obj.team_slug}


class AuditFilterInput(serializers.Serializer[Any]):
    actor = serializers.CharField(required=False, max_length=150)
    action = serializers.CharField(required=False, max_length=64)
    target = serializers.CharField(required=False, max_length=200)
    outcome = serializers.ChoiceField(required=False, choices=["success", "failure", "denied"])
    team = serializers.CharField(required=False, max_length=64)
    model = serializers.CharField(required=False, max_length=100)
    request_id = serializers.CharField(required=False, max_length=64)
    # "from" is a Python keyword, hence the explicit source mapping in the view.
    since = serializers.DateTimeField(required=False)
    until = serializers.DateTimeField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("since") and attrs.get("until") and attrs["since"] >= attrs["until"]:
            raise serializers.ValidationError({"from": "'from' must be earlier than 'to'."})
        return attrs


class ChainProblemSerializer(serializers.Serializer[Any]):
    kind = serializers.ChoiceField(choices=["store_unreachable", "checkpoint_unreadable", "checkpoint_bad_signature",
                                            "checkpoint_missing", "checkpoint_broken_link", "checkpoint_replaced",
                                            "events_missing", "chain_rewritten", "head_went_backwards"])
    message = serializers.CharField()
    seq = serializers.IntegerField(allow_null=True, help_text="the event where it shows")
    checkpoint = serializers.IntegerField(allow_null=True, help_text="the checkpoint's number")


class CheckpointSummarySerializer(serializers.Serializer[Any]):
    number = serializers.IntegerField()
    seq = serializers.IntegerField()
    head_hash = serializers.CharField()
    time = serializers.CharField()
    name = serializers.CharField()
    sha256 = serializers.CharField()


class ChainVerdictSerializer(serializers.Serializer[Any]):
    ok = serializers.BooleanField()
    events = serializers.IntegerField()
    head = serializers.CharField()
    first_bad = serializers.IntegerField(allow_null=True)
    reason = serializers.CharField(allow_blank=True)
    problems = ChainProblemSerializer(many=True, required=False)
    checkpoints = serializers.IntegerField(required=False, help_text="checkpoint files in the store")
    newest_checkpoint = CheckpointSummarySerializer(allow_null=True, required=False)
