"""A module-level app for servers and tools that want one: ``examples.factory.wsgi:app``."""

from __future__ import annotations

from . import create_app

app = create_app()
