"""Read the tables back out of rendered reports (text, markdown, HTML), for tests that compare
every shown value with the JSON report. Each reader gives {title: (header, rows)} with module
paths in full (text tables print them relative to a common prefix)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

Tables = dict[str, tuple[list[str], list[list[str]]]]


def text_tables(text: str) -> Tables:
    """Tables of `render_text`: title, underline, header, dashes (which give the columns), rows."""
    lines = text.splitlines()
    tables: Tables = {}
    for i in range(len(lines) - 3):
        title, underline, header, dashes = lines[i : i + 4]
        if not title or underline != "-" * len(title) or not re.fullmatch(r"-+(  -+)*", dashes):
            continue
        spans = [m.span() for m in re.finditer(r"-+", dashes)]
        spans[-1] = (spans[-1][0], None)

        def cells(line: str) -> list[str]:
            return [line[a:b].strip() for a, b in spans]

        rows, j = [], i + 4
        while j < len(lines) and lines[j] and not lines[j].startswith("  ") and lines[j] != "(none)":
            rows.append(cells(lines[j]))
            j += 1
        notes = []
        while j < len(lines) and lines[j].startswith("  "):
            notes.append(lines[j].strip())
            j += 1
        prefix = next((n.removeprefix("module paths relative to ") for n in notes
                       if n.startswith("module paths relative to ")), "")
        rows = [[prefix + row[0], *row[1:]] for row in rows]
        tables[title] = (cells(header), rows)
    return tables


def markdown_tables(markdown: str) -> Tables:
    """Tables of `render_markdown`: a `## title`, then a pipe table."""
    tables: Tables = {}
    title = None
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            title = line[3:]
        elif title and line.startswith("| ") and i + 1 < len(lines) and re.fullmatch(r"\|(:?-+:?\|)+", lines[i + 1]):
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("| "):
                    break
                body.append(_markdown_cells(row))
            tables[title] = (_markdown_cells(line), body)
            title = None
    return tables


def _markdown_cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\) \| ", line[2:-2])
    return [c.replace("\\|", "|").replace("\\*", "*").replace("\\_", "_") for c in cells]


def html_tables(page: str) -> Tables:
    """Tables of `render_html`: an `<h2>` title, then a table of th/td cells."""
    parser = _TableParser()
    parser.feed(page)
    return parser.tables


class _TableParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: Tables = {}
        self.title: str | None = None
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None
        self.in_h2 = False

    def handle_starttag(self, tag, attrs):
        if tag == "h2":
            self.in_h2, self.title = True, ""
        elif tag == "table":
            self.rows = []
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag == "h2":
            self.in_h2 = False
        elif tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append("".join(self.cell))
            self.cell = None
        elif tag == "table" and self.title:
            self.tables[self.title] = (self.rows[0], self.rows[1:])

    def handle_data(self, data):
        if self.in_h2:
            self.title += data
        elif self.cell is not None:
            self.cell.append(data)


def column(table: tuple[list[str], list[list[str]]], name: str, occurrence: int = 0) -> dict[str, str]:
    """{module: cell} of the `occurrence`-th column called `name` (headers may repeat)."""
    header, rows = table
    index = [i for i, h in enumerate(header) if h == name][occurrence]
    return {row[0]: row[index] for row in rows}


def shown(value: float, digits: int) -> float:
    """`value` as a table shows it: `digits` significant digits."""
    return float(f"{value:.{digits}g}")
