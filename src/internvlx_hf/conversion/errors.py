"""The one exception type of `internvlx convert`, and the JSON reader that raises it for a source's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ConversionError(ValueError):
    """The source checkpoint or the options cannot be converted.

    Messages name the offending input (file, key, option) and say how to fix it; the CLI prints them without a
    traceback. A `ValueError`, so callers that catch bad input generically catch it too.
    """


def read_json_file(path: Path, what: str = "file") -> Any:
    """Parse a JSON file of the source; a ConversionError naming it (and the fix) if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(
            f"{path} is not valid JSON ({error}); the {what} is corrupt or truncated: copy it again from the "
            "original checkpoint."
        ) from None
    except OSError as error:
        raise ConversionError(f"cannot read {path} ({error.strerror or error}); check that it is a readable file.") \
            from None
