"""A gallery of small flask_datastar apps; each module runs on its own (see README.md)."""
