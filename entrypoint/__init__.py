"""The front door of llava-bench: CLI, preflight, launch and supervision."""

__version__ = "0.1.0"  # the one place the version is written; pyproject reads it
