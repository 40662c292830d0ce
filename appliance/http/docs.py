"""The API reference at ``/api/docs``: one HTML page rendered on the server from the OpenAPI schema.

The box must work offline, so there is no Swagger UI from a CDN; this page needs no script or asset,
and the schema itself is at ``/api/openapi.json`` for tools.
"""

from __future__ import annotations

import html
import json
from typing import Any

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#1d2530}
h2{margin-top:2rem;border-bottom:1px solid #ccd;text-transform:capitalize}
.op{margin:1rem 0;padding:.6rem .8rem;border:1px solid #dde;border-radius:6px}
.m{display:inline-block;min-width:4.5rem;font-weight:700}
.GET{color:#1565c0}.POST{color:#2e7d32}.PATCH{color:#8d6e00}.DELETE{color:#c62828}
code,pre{font:13px ui-monospace,monospace;background:#f4f5f8;border-radius:4px}
pre{padding:.5rem;overflow-x:auto}small{color:#556}
"""


def _schema_name(schema: dict[str, Any] | None) -> str:
    if not schema:
        return ""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if schema.get("type") == "array":
        return f"list of {_schema_name(schema.get('items'))}"
    if "anyOf" in schema:
        return " or ".join(_schema_name(s) for s in schema["anyOf"])
    return str(schema.get("type", ""))


def render_docs(spec: dict[str, Any]) -> str:
    esc = html.escape
    groups: dict[str, list[str]] = {}
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            params = "".join(
                f"<li><code>{esc(p['name'])}</code> ({esc(p['in'])}{', required' if p.get('required') else ''}) "
                f"{esc(_schema_name(p.get('schema')))} <small>{esc(p.get('description', ''))}</small></li>"
                for p in op.get("parameters", []))
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            answers = ", ".join(
                f"{esc(code)} {esc(_schema_name(r.get('content', {}).get('application/json', {}).get('schema')))}"
                for code, r in op.get("responses", {}).items())
            groups.setdefault((op.get("tags") or ["other"])[0], []).append(
                f'<div class="op"><span class="m {method.upper()}">{method.upper()}</span><code>{esc(path)}</code>'
                f" <b>{esc(op.get('summary', ''))}</b> <small>needs: {esc(op.get('x-required-role', '?'))}</small>"
                f"<br><small>{esc(op.get('description', ''))}</small>"
                + (f"<ul>{params}</ul>" if params else "")
                + (f"<div>body: <code>{esc(_schema_name(body))}</code></div>" if body else "")
                + f"<div><small>answers: {answers}</small></div></div>")
    schemas = spec.get("components", {}).get("schemas", {})
    models = "".join(f"<h3 id='{esc(name)}'>{esc(name)}</h3>"
                     f"<pre>{esc(json.dumps(s.get('properties', s), indent=1))}</pre>"
                     for name, s in sorted(schemas.items()))
    sections = "".join(f"<h2>{esc(tag)}</h2>{''.join(ops)}" for tag, ops in groups.items())
    title = esc(spec.get("info", {}).get("title", "API"))
    return (f"<!doctype html><html lang=en><meta charset=utf-8><meta name=viewport content='width=device-width'>"
            f"<title>{title} API</title><style>{_STYLE}</style><h1>{title} API</h1>"
            "<p>Log in with <code>POST /api/v1/login</code> (session cookie, and send the returned CSRF token as "
            "<code>X-CSRF-Token</code> on every change), or send an API token as "
            "<code>Authorization: Bearer &lt;token&gt;</code>. Errors are <code>{\"error\": \"...\"}</code>. "
            "The machine-readable schema is <a href='/api/openapi.json'>/api/openapi.json</a>.</p>"
            f"{sections}<h2>bodies</h2>{models}</html>")
