from __future__ import annotations

from typing import Any

from django import forms

from portal.models import Team
from registry.models import MODEL_NAME_VALIDATOR


class ModelRegisterForm(forms.Form):
    name = forms.CharField(max_length=100, validators=[MODEL_NAME_VALIDATOR],
                           help_text="Lowercase letters, digits and hyphens, such as churn-classifier.")
    team = forms.ModelChoiceField(queryset=Team.objects.none(), to_field_name="slug")
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}), max_length=5000)
    tags = forms.CharField(required=False, max_length=500, help_text="Comma-separated.")

    def __init__(self, *args: Any, teams: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = teams if teams is not None else Team.objects.none()  # type: ignore[attr-defined]


class TrustDecisionForm(forms.Form):
    decision = forms.ChoiceField(choices=[("trust", "Trust these types"), ("refuse", "Refuse")])
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), min_length=10, max_length=2000)
    remember_for_team = forms.BooleanField(required=False, label="Also trust these types for this team's future uploads")
