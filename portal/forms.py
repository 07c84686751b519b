from __future__ import annotations

from django import forms


class LoginForm(forms.Form):
    username = forms.CharField(max_length=150, widget=forms.TextInput(attrs={"autocomplete": "username", "autofocus": True}))
    password = forms.CharField(max_length=256, strip=False,
                               widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}))


class TokenCreateForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What will use it, such as 'ci-pipeline'.")
    expires_in_days = forms.IntegerField(min_value=1, max_value=3650, required=False,
                                         help_text="Leave empty for a token that does not expire.")
    password = forms.CharField(max_length=512, strip=False, required=False, label="Your password",
                               widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
                               help_text="Approvers and administrators confirm a new token with their password.")


class AuditFilterForm(forms.Form):
    actor = forms.CharField(required=False, max_length=150)
    action = forms.CharField(required=False, max_length=64, help_text="auth.login, or a domain such as auth")
    target = forms.CharField(required=False, max_length=200, help_text="type or type:id")
    outcome = forms.ChoiceField(required=False, choices=[("", "any"), ("success", "success"),
                                                         ("failure", "failure"), ("denied", "denied")])
    model = forms.CharField(required=False, max_length=100, help_text="everything that happened to one model")
    request_id = forms.CharField(required=False, max_length=64)
    since = forms.DateTimeField(required=False, label="From (UTC)",
                                widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    until = forms.DateTimeField(required=False, label="To (UTC)",
                                widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))

    def clean(self) -> dict:
        data = super().clean() or {}
        if data.get("since") and data.get("until") and data["since"] >= data["until"]:
            raise forms.ValidationError("'From' must be earlier than 'To'.")
        return data
