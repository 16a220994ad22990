"""Reports of `analyze` and `compare`: one JSON-ready dict (versioned schema, `schema.json`),
rendered as an aligned text table, markdown, JSON, or a self-contained HTML page.

    report = analyze_report(analyze_adapter(adapter), adapter)
    print(render_report(report, "text"))
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Mapping

from .build import SCHEMA_VERSION, analyze_report, compare_report
from .grouping import layer_of, projection_type
from .tables import analyze_header, analyze_tables, compare_header, compare_tables, render_markdown, render_text

FORMATS = ("text", "markdown", "json", "html")


def load_schema() -> dict:
    """The JSON Schema (draft 2020-12) of every report, shipped with the package."""
    return json.loads(resources.files(__package__).joinpath("schema.json").read_text(encoding="utf-8"))


def render_report(report: Mapping, fmt: str = "text") -> str:
    """`report` as text, markdown, json, or html (html: `analyze` reports only)."""
    if fmt == "json":
        return json.dumps(report, indent=1, ensure_ascii=False) + "\n"
    kind = report["kind"]
    if fmt == "html":
        if kind != "analyze":
            raise ValueError("HTML is rendered for analyze reports only")
        from .html import render_html

        return render_html(report)
    if kind == "analyze":
        title, header, tables = "LoRA adapter analysis", analyze_header(report), analyze_tables(report)
    else:
        title, header, tables = "LoRA adapter comparison", compare_header(report), compare_tables(report)
    if fmt == "text":
        return render_text(title, header, tables)
    if fmt == "markdown":
        return render_markdown(title, header, tables)
    raise ValueError(f"unknown report format {fmt!r}: use one of {', '.join(FORMATS)}")


__all__ = [
    "FORMATS",
    "SCHEMA_VERSION",
    "analyze_report",
    "compare_report",
    "layer_of",
    "load_schema",
    "projection_type",
    "render_report",
]
