"""End-to-end tests: the examples served by a real gunicorn, driven by headless Chromium."""
