"""The installed version, read from the package metadata (cheap: the CLI's --version imports nothing else)."""
from __future__ import annotations


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("emulate")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
