"""The small markup layer of the report: markdown-ish text to HTML, table cells, the page template.

Text blocks are a deliberately small subset of Markdown, rendered the same way everywhere:

- paragraphs are separated by blank lines; consecutive lines starting with ``- `` form a list;
- inline: ```code```, ``**bold**``, ``*italic*`` and ``[text](url)`` links (http, https, mailto,
  relative paths and ``#anchors`` only; any other scheme, such as ``javascript:``, stays text).

Everything else is escaped, so text from anywhere (model outputs included) is safe in the HTML.
"""

from __future__ import annotations

import html
import math
import re
from string import Template

_CODE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[([^\]\n]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_ITALIC = re.compile(r"(?<![*\w])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![*\w])")
_SAFE_SCHEMES = ("http:", "https:", "mailto:")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
FLOAT_DIGITS = 4  # significant digits of a float in a table cell
MISSING = "—"  # a table cell with no value


def _safe_url(url: str) -> bool:
    return not _SCHEME.match(url) or url.lower().startswith(_SAFE_SCHEMES)


def _emphasis(escaped: str) -> str:
    escaped = _BOLD.sub(r"<strong>\1</strong>", escaped)
    return _ITALIC.sub(r"<em>\1</em>", escaped)


def _spans(text: str) -> str:
    out, pos = [], 0
    for m in _LINK.finditer(text):
        out.append(_emphasis(html.escape(text[pos : m.start()])))
        label, url = _emphasis(html.escape(m.group(1))), m.group(2)
        if _safe_url(url):
            out.append(f'<a href="{html.escape(url, quote=True)}">{label}</a>')
        else:
            out.append(html.escape(m.group(0)))
        pos = m.end()
    out.append(_emphasis(html.escape(text[pos:])))
    return "".join(out)


def inline_html(text: str) -> str:
    """One line of markdown-ish text as escaped HTML with code, emphasis and links."""
    parts = _CODE.split(text)
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else _spans(p) for i, p in enumerate(parts))


def text_html(text: str) -> str:
    out = []
    for kind, lines in _paragraphs(text):
        if kind == "ul":
            out.append("<ul>\n" + "".join(f"<li>{inline_html(x)}</li>\n" for x in lines) + "</ul>")
        else:
            out.append(f"<p>{inline_html(' '.join(lines))}</p>")
    return "\n".join(out)


def _paragraphs(text: str) -> list[tuple[str, list[str]]]:
    """Paragraphs split on blank lines; within one, runs of ``- `` lines are lists."""
    out: list[tuple[str, list[str]]] = []
    for para in re.split(r"\n\s*\n", text.strip()):
        current: tuple[str, list[str]] | None = None
        for line in (x.strip() for x in para.splitlines()):
            if not line:
                continue
            kind = "ul" if line.startswith("- ") else "p"
            item = line[2:].strip() if kind == "ul" else line
            if current is None or current[0] != kind:
                current = (kind, [])
                out.append(current)
            current[1].append(item)
    return out


_QUANTITY = re.compile(r"^[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?\s?(%|[KMBT]|[KMGT]?i?B|s|min|x|×)?$|^\d+ min \d+ s$")


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_quantity(v) -> bool:
    """A number, or text that reads as one with a unit ("2.508M", "4.78 MiB", "91%"): right-aligned."""
    return is_number(v) or (isinstance(v, str) and bool(_QUANTITY.match(v.strip())))


def format_cell(v) -> str:
    """A table cell as text: ints with thousands separators, floats to FLOAT_DIGITS significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{FLOAT_DIGITS}g}"
    return str(v)


CSS = """
:root { --fg: #1d2430; --muted: #5b6676; --line: #d9dee7; --accent: #2f6fba; --bg-alt: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.55;
       font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 960px; margin: 0 auto; padding: 2rem 1.25rem 4rem; }
h1 { font-size: 1.9rem; margin: 0 0 .25rem; }
h2 { font-size: 1.35rem; margin: 2.2rem 0 .6rem; padding-bottom: .25rem; border-bottom: 1px solid var(--line); }
.subtitle { color: var(--muted); margin: 0 0 1.5rem; }
a { color: var(--accent); }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .9em;
       background: var(--bg-alt); padding: .05em .3em; border-radius: 3px; }
table { border-collapse: collapse; margin: .8rem 0 1.2rem; font-size: .92rem; width: auto; max-width: 100%;
        display: block; overflow-x: auto; }
caption { caption-side: top; text-align: left; color: var(--muted); padding-bottom: .35rem; }
th, td { border-bottom: 1px solid var(--line); padding: .35rem .7rem; text-align: left; vertical-align: top; }
th { background: var(--bg-alt); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.total td { font-weight: 600; border-top: 2px solid var(--line); }
figure { margin: 1rem 0 1.5rem; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .35rem; }
dl.info { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: 0 0 1rem; }
dl.info dt { color: var(--muted); }
dl.info dd { margin: 0; }
.scale { background: #fff8e6; border: 1px solid #f0d9a0; border-radius: 6px; padding: .2rem 1.2rem 1rem; }
.scale h3 { margin: 1rem 0 .3rem; font-size: 1.05rem; }
"""

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>$css</style>
</head>
<body>
<main>
$body
</main>
</body>
</html>
""")
