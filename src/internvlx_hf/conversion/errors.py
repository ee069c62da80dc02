"""The one exception type of `internvlx convert`."""

from __future__ import annotations


class ConversionError(ValueError):
    """The source checkpoint or the options cannot be converted.

    Messages name the offending input (file, key, option) and say how to fix it; the CLI prints them without a
    traceback. A `ValueError`, so callers that catch bad input generically catch it too.
    """
