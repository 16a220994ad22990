"""Reports of `analyze` and `compare`: one JSON-ready record (versioned schema, `schema.json`;
its types in `types.py`), rendered as an aligned text table, markdown, JSON, or a
self-contained HTML page. Figures of reports (matplotlib, imported on use): `html`, `figures`.

    report = analyze_report(analyze_adapter(adapter), adapter)
    print(render_report(report, "text"))
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from .build import SCHEMA_VERSION, analyze_report, compare_report
from .tables import analyze_header, analyze_tables, compare_header, compare_tables, render_markdown, render_text
from .types import AnalyzeReport, CompareReport, Report

FORMATS = ("text", "markdown", "json", "html")


def load_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of every report, shipped with the package."""
    schema: dict[str, Any] = json.loads(resources.files(__package__).joinpath("schema.json").read_text(encoding="utf-8"))
    return schema


def render_report(report: Report, fmt: str = "text") -> str:
    """`report` as text, markdown, json, or html (html: `analyze` reports only)."""
    if fmt == "json":
        return json.dumps(report, indent=1, ensure_ascii=False) + "\n"
    if fmt == "html":
        if report["kind"] != "analyze":
            raise ValueError("HTML is rendered for analyze reports only")
        from .html import render_html

        return render_html(report)
    if report["kind"] == "analyze":
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
    "AnalyzeReport",
    "CompareReport",
    "Report",
    "analyze_report",
    "compare_report",
    "load_schema",
    "render_report",
]
