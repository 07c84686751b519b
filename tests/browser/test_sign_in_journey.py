"""Each demo user signs in in a real browser and sees their role's navigation; a wrong password is explained."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import call_command

from tests.browser.conftest import screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

NAVIGATION = {
    "ds": ["Home", "Models", "Promotions", "Endpoints", "Monitoring", "API docs", "Account"],
    "approver1": ["Home", "Models", "Promotions", "Endpoints", "Monitoring", "API docs", "Account"],
    "approver2": ["Home", "Models", "Promotions", "Endpoints", "Monitoring", "API docs", "Account"],
    "compliance": ["Home", "Models", "Promotions", "Endpoints", "Monitoring", "Audit trail", "Data subjects", "API docs", "Account"],
    "admin": ["Home", "Models", "Promotions", "Endpoints", "Monitoring", "MLflow", "Audit trail", "Data subjects", "API docs", "Account", "Administration"],
}
ROLE_LABEL = {"ds": "Data scientist", "approver1": "Approver", "approver2": "Approver",
              "compliance": "Compliance officer", "admin": "Administrator"}


def test_each_demo_user_signs_in_and_sees_their_navigation(page: Any, settings: Any) -> None:
    call_command("seed_demo", "--force", "--users-only")
    for username, expected in NAVIGATION.items():
        page.goto("/")
        assert "/login/" in page.url
        page.fill("#id_username", username)
        page.fill("#id_password", settings.PORTAL_DEMO_PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("nav.mainnav")
        assert page.locator("nav.mainnav a").all_inner_texts() == expected
        assert page.inner_text("[data-testid=roles]") == ROLE_LABEL[username]
        assert "demo" in page.inner_text("main")
        screenshot(page, f"sign-in-{username}")
        page.click("text=Sign out")
        page.wait_for_selector("#id_username")
        assert "You are signed out." in page.inner_text("main")
    assert not page.console_errors, page.console_errors


def test_a_wrong_password_is_explained_in_the_page(page: Any) -> None:
    call_command("seed_demo", "--force", "--users-only")
    page.goto("/login/")
    page.fill("#id_username", "ds")
    page.fill("#id_password", "not-the-password")
    page.click("button[type=submit]")
    assert "Wrong username or password." in page.inner_text("[role=alert]")


def test_a_token_created_on_the_account_page_is_shown_once(page: Any, settings: Any) -> None:
    call_command("seed_demo", "--force", "--users-only")
    page.goto("/login/")
    page.fill("#id_username", "ds")
    page.fill("#id_password", settings.PORTAL_DEMO_PASSWORD)
    page.click("button[type=submit]")
    page.click("nav.mainnav >> text=Account")
    page.fill("#id_name", "laptop")
    page.click("text=Create token")
    token = page.inner_text("[data-testid=new-token]")
    assert token.startswith("mlp_")
    screenshot(page, "account-token")
    page.reload()
    assert token not in page.content()
    assert "laptop" in page.inner_text("[data-testid=tokens]")
