"""Import an optional package, or say how to install it."""

from __future__ import annotations

import importlib


def import_optional(name: str, user: str, install_hint: str):
    """Import ``name`` for module ``user``; if its top package is missing, name the install command.

    A missing *dependency* of an installed package is re-raised as it is: that is a
    broken install, and its own error says more than an install hint would.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not name.startswith(e.name):
            raise
        raise ModuleNotFoundError(f"{user} needs {name}: {install_hint}", name=e.name) from None
