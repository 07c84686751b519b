"""The batch-schedule form: every field checked in one pass (the rules are the batch service's own)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from registry.batch.services import _check_cron, _check_location
from registry.models import BatchSchedule
from registry.versions.forms import messages_of


class BatchScheduleForm(forms.Form):
    """A schedule: every field checked in one pass, so the page lists every problem at once and keeps what was
    typed. The service checks the same rules again (the API calls it directly)."""

    name = forms.CharField(max_length=100)
    environment = forms.ChoiceField(choices=[(e, e) for e in ("dev", "stage", "prod")])
    location = forms.CharField(max_length=500)
    cron = forms.CharField(max_length=100, label="Cron (minute hour day month weekday, UTC)")
    id_column = forms.CharField(required=False, max_length=200)
    subject_column = forms.CharField(required=False, max_length=200)

    def __init__(self, *args: Any, model: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model = model

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if BatchSchedule.objects.filter(model=self.model, name=name).exists():
            raise ValidationError(f"{self.model.name} already has a schedule named {name!r}.")
        return name

    def clean_location(self) -> str:
        try:
            return _check_location(self.cleaned_data["location"])
        except ValidationError as exc:
            raise ValidationError(messages_of(exc)) from None

    def clean_cron(self) -> str:
        cron = " ".join(self.cleaned_data["cron"].split())
        try:
            _check_cron(cron)
        except ValidationError as exc:
            raise ValidationError(messages_of(exc)) from None
        return cron
