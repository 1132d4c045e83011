"""Write the HTTP API reference (reference/http.md) from the server's own OpenAPI schema.

Builds the FastAPI app of ``histoscan serve`` (nothing is loaded until a server starts, so no model is
needed) and renders each route and each schema as Markdown. Run by mkdocs-gen-files during
``mkdocs build``; ``python docs/scripts/gen_http.py`` prints the page.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from schema_md import _cell, definitions, type_of

PAGE = "reference/http.md"


def openapi() -> dict[str, Any]:
    """The OpenAPI document of the app ``histoscan serve`` runs."""
    from histoscan.serving.app import create_app
    from histoscan.serving.state import ServeSettings

    return create_app(ServeSettings("RUN")).openapi()


def render() -> str:
    """The whole HTTP reference page as Markdown."""
    doc = openapi()
    lines = [
        "# HTTP API reference",
        "",
        f"Generated from the OpenAPI schema of `histoscan serve` (version {doc['info']['version']}) by",
        "`docs/scripts/gen_http.py` on every build. A running server shows the same schema at `/openapi.json`",
        "and an interactive page at `/docs`. With an API key set (the `HISTOSCAN_API_KEY` environment variable),",
        "requests send it as `Authorization: Bearer <key>`.",
        "",
        "| method | path | what it does |",
        "| --- | --- | --- |",
    ]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            anchor = op["operationId"].replace("_", "-")
            lines.append(f"| {method.upper()} | [`{path}`](#{anchor}) | {_cell(op.get('summary', ''))} |")
    lines.append("")
    schemas = doc.get("components", {}).get("schemas", {})
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            anchor = op["operationId"].replace("_", "-")
            lines += [f"## {method.upper()} {path} {{#{anchor}}}", ""]
            if op.get("description"):
                lines += [op["description"].strip(), ""]
            params = op.get("parameters", [])
            if params:
                lines += ["| parameter | in | type | required | description |", "| --- | --- | --- | --- | --- |"]
                for p in params:
                    lines.append(
                        f"| `{p['name']}` | {p['in']} | {_cell(type_of(p.get('schema', {})))} "
                        f"| {'yes' if p.get('required') else ''} | {_cell(p.get('description', ''))} |"
                    )
                lines.append("")
            body = op.get("requestBody")
            if body:
                for media, content in body.get("content", {}).items():
                    lines += [f"Request body (`{media}`): {type_of(content.get('schema', {}))}", ""]
            lines += ["| status | description | body |", "| --- | --- | --- |"]
            for status, resp in op.get("responses", {}).items():
                body_types = [type_of(c.get("schema", {})) for c in resp.get("content", {}).values()]
                lines.append(f"| {status} | {_cell(resp.get('description', ''))} | {_cell(', '.join(body_types))} |")
            lines.append("")
    lines += ["## Schemas", ""]
    lines += definitions(schemas)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
else:  # run by mkdocs-gen-files
    import mkdocs_gen_files

    with mkdocs_gen_files.open(PAGE, "w") as fh:
        fh.write(render())
