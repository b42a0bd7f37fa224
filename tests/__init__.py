"""Tests of flask_datastar; ``tests.helpers`` holds the shared test infrastructure."""
