"""Forms of the model and version pages: registering a model, deciding on untrusted types, tags."""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from portal.models import Team
from registry.models import MODEL_NAME_VALIDATOR
from registry.versions.services import validate_tags


NAME_RULE = ("1 to 100 lowercase letters, digits and hyphens, starting and ending with a letter or digit, "
             "such as churn-classifier")


class ModelRegisterForm(forms.Form):
    name = forms.CharField(max_length=100, validators=[MODEL_NAME_VALIDATOR],
                           help_text="Lowercase letters, digits and hyphens, such as churn-classifier.",
                           # The browser's own check names the rule (its "match the requested format" message
                           # appends the title), instead of only saying that the pattern was not matched.
                           widget=forms.TextInput(attrs={"pattern": r"[a-z0-9]([a-z0-9\-]{0,98}[a-z0-9])?",
                                                         "title": NAME_RULE, "autocapitalize": "none",
                                                         "spellcheck": "false"}))
    team = forms.ModelChoiceField(queryset=Team.objects.none(), to_field_name="slug")
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}), max_length=5000)
    tags = forms.CharField(required=False, max_length=500, help_text="Comma-separated.")

    def __init__(self, *args: Any, teams: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = teams if teams is not None else Team.objects.none()  # type: ignore[attr-defined]
        if teams is not None and teams.count() == 1:  # a user's only team is the answer: no "---------" to change
            self.fields["team"].empty_label = None  # type: ignore[attr-defined]
            self.fields["team"].initial = teams.first()


class TrustDecisionForm(forms.Form):
    decision = forms.ChoiceField(choices=[("trust", "Trust these types"), ("refuse", "Refuse")])
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), min_length=10, max_length=2000)
    remember_for_team = forms.BooleanField(required=False, label="Also trust these types for this team's future uploads")


def messages_of(exc: ValidationError) -> list[str]:
    if hasattr(exc, "error_dict"):
        return [str(m) for errors in exc.error_dict.values() for e in errors for m in e.messages]
    return list(exc.messages)


class TagsForm(forms.Form):
    """Tags as typed: comma-separated (the rules are ``services.validate_tags``'s, shared with the API)."""

    tags = forms.CharField(required=False, max_length=2000, help_text="Comma-separated, such as team:risk, pii.")

    def clean_tags(self) -> list[str]:
        try:
            return validate_tags(self.cleaned_data["tags"])
        except ValidationError as exc:
            raise ValidationError(messages_of(exc)) from None
