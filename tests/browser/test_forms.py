"""examples/forms.py: server-side validation with the errors patched back by id."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Tabs, screenshot
from tests.helpers import GunicornServer

pytestmark = [pytest.mark.browser, pytest.mark.live]


def test_errors_are_patched_next_to_the_fields_until_the_form_is_valid(
    tabs: Tabs, serve: Callable[..., GunicornServer], expect: Any, screenshot_dir: Path
) -> None:
    server = serve("examples.forms:app")
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    page = tabs.open(server.url + "/")

    page.click("#submit")
    expect(page.locator("#email-error")).to_have_text(
        "Enter an email address like name@example.com."
    )
    expect(page.locator("#age-error")).to_have_text("Enter your age in years, as a number.")
    expect(page.locator("#password-error")).to_have_text("Use at least 8 characters.")

    page.fill("#email", email)
    page.fill("#age", "12")
    page.click("#submit")
    expect(page.locator("#email-error")).to_have_text("")
    expect(page.locator("#age-error")).to_have_text("You must be 13 or older to sign up.")
    expect(page.locator("#password-error")).to_have_text("Use at least 8 characters.")
    # Submitting did not reload the page: what was typed is still there.
    expect(page.locator("#email")).to_have_value(email)
    screenshot(page, screenshot_dir / "forms.png", height=300)

    page.fill("#age", "36")
    page.fill("#password", "correct horse")
    page.click("#submit")
    expect(page.locator("#welcome")).to_have_text(f"Welcome, {email}! Check your inbox.")
    expect(page.locator("form")).to_have_count(0)

    # The server remembers the account: a second sign-up with it is refused.
    again = tabs.open(server.url + "/")
    again.fill("#email", email.upper())
    again.fill("#age", "36")
    again.fill("#password", "correct horse")
    again.click("#submit")
    expect(again.locator("#email-error")).to_have_text(f"{email.upper()} already has an account.")
    expect(again.locator("#age-error")).to_have_text("")
