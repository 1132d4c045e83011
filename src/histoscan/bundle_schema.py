"""The JSON Schema of ``model.json``, exported from the pydantic schema that reads it (``histoscan.runfolder``).

For the documentation and for tools outside histoscan (editors, CI checks of hand-edited files)::

    python -m histoscan.bundle_schema model.schema.json

or from Python, ``histoscan.bundle_schema.json_schema()``. The schema describes the newest
``schema_version``; histoscan itself also reads older files (it upgrades them, ``runfolder.migrate``),
which this schema does not accept as they are.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from histoscan.runfolder import DOCUMENT, MODEL_FILE, SCHEMA_VERSION


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``model.json`` at the current ``schema_version``.

    It accepts a single model or an ensemble, told apart by ``kind``.
    """
    schema = DOCUMENT.json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"histoscan {MODEL_FILE} (schema_version {SCHEMA_VERSION})",
        **schema,
    }


def write_json_schema(path: str | Path) -> Path:
    """Write ``json_schema()`` to ``path`` (indented JSON) and return the path."""
    p = Path(path)
    p.write_text(json.dumps(json_schema(), indent=2) + "\n")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m histoscan.bundle_schema [OUT]``: write the schema to OUT, or print it."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(write_json_schema(args[0]))
    else:
        print(json.dumps(json_schema(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
