"""Render JSON Schema objects (from pydantic or an OpenAPI document) as Markdown tables.

Written here because the pages need plain tables in the site's own style, and the schema-rendering
plugins for MkDocs either need a network fetch at build time or render whole HTML widgets.
"""

from __future__ import annotations

from typing import Any


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def type_of(prop: dict[str, Any]) -> str:
    """A short type for one JSON Schema property: ``integer``, ``array of number``, ``Model``, ``string or null``."""
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in prop or "oneOf" in prop:
        return " or ".join(type_of(p) for p in prop.get("anyOf", prop.get("oneOf", [])))
    if "allOf" in prop and len(prop["allOf"]) == 1:
        return type_of(prop["allOf"][0])
    if "enum" in prop:
        return "one of " + ", ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    kind = prop.get("type", "any")
    if kind == "array":
        items = prop.get("items")
        return "array of " + (type_of(items) if items else "any")
    if kind == "object" and isinstance(prop.get("additionalProperties"), dict):
        return "map of " + type_of(prop["additionalProperties"])
    if isinstance(kind, list):
        return " or ".join(kind)
    return str(kind)


def object_table(schema: dict[str, Any]) -> list[str]:
    """Markdown lines: one row per property of an object schema (name, type, required, default, description)."""
    props = schema.get("properties", {})
    if not props:
        return [_cell(schema.get("description", "(no fields)")), ""]
    required = set(schema.get("required", []))
    lines = ["| field | type | required | default | description |", "| --- | --- | --- | --- | --- |"]
    for name, prop in props.items():
        default = f"`{prop['default']}`" if "default" in prop else ""
        lines.append(
            f"| `{name}` | {_cell(type_of(prop))} | {'yes' if name in required else ''} | {_cell(default)} "
            f"| {_cell(prop.get('description', ''))} |"
        )
    return [*lines, ""]


def definitions(defs: dict[str, Any], level: str = "###") -> list[str]:
    """A section per named schema (pydantic ``$defs`` or OpenAPI ``components.schemas``), sorted by name."""
    lines: list[str] = []
    for name in sorted(defs):
        schema = defs[name]
        lines += [f"{level} {name}", ""]
        if schema.get("description"):
            lines += [schema["description"].strip(), ""]
        lines += object_table(schema)
    return lines
