"""The one base class of every error sepit raises on purpose.

Each module keeps its own, precise exception class (``ConfigError``, ``StoreError``,
``TrainingError``, ...) and derives it from :class:`SepitError` as well as from the built-in
class callers already catch (``class ConfigError(SepitError, ValueError)``).  A command catches
``SepitError`` alone and prints ``sepit <command>: <message>`` with its exit code; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class SepitError(Exception):
    """An error sepit raises on purpose: the message names the thing and the reason, in one line."""
