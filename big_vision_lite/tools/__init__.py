"""Command-line helpers run with `python -m big_vision_lite.tools.<name>` (e.g. plot)."""
