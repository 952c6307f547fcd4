"""The front door of llava-bench: CLI, preflight, launch and supervision."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llava-bench")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
