"""The demo report: ``DIR/report.md`` and ``DIR/report.html`` rendered from one plain dict.

``render_report(report, out_dir)`` writes both files (atomically) and returns their paths. The
HTML is one self-contained file: CSS inline and every image embedded as a base64 ``data:`` URI,
so it opens from disk and can be mailed around. The Markdown links the images by relative path.

Schema of ``report`` (unknown keys are errors, so a typo does not silently drop content)::

    {
      "title": str,                                  # required
      "subtitle": str,                               # optional, one line of text (markup below)
      "run_info": {label: value, ...},               # optional: command, machine, seed, versions...
      "timings": [{"stage": str, "seconds": float}], # optional: a table with each stage's share and the total
      "sections": [                                  # required, may be empty
        {"title": str,
         "blocks": [                                 # rendered in order
           "a paragraph of text",                    # a bare string is a text block
           {"text": str},                            # paragraphs and "- " lists (see report_markup)
           {"table": {"headers": [str, ...],
                      "rows": [[cell, ...], ...],    # each row as long as headers; a cell is a str,
                      "caption": str}},              # int, float, bool or None (optional caption)
           {"image": {"path": str, "caption": str, "alt": str}},  # PNG/JPEG/GIF/SVG/WebP; a
                                                     # relative path is relative to out_dir
         ]},
      ],
      "scale_notes": {"shown": [str, ...],           # optional, rendered last: what this scale
                      "not_shown": [str, ...]},      # demonstrates, and what it does not
    }

Text anywhere is the markdown-ish subset of ``effilm.reports.markup``: paragraphs, ``- `` lists,
```code```, ``**bold**``, ``*italic*``, ``[links](url)``; everything else is escaped in the HTML.

``model_cost_table(models, seq_len)`` builds the table block of total and active parameters,
FLOPs per token and memory for presets, ``ModelConfig`` objects or model-config dicts.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from effilm.errors import EffilmError, closest
from effilm.io import atomic_write_bytes, atomic_write_text
from effilm.reports.markup import CSS, PAGE, format_cell, inline_html, is_number, is_quantity, text_html

REPORT_KEYS = ("title", "subtitle", "run_info", "timings", "sections", "scale_notes")
BLOCK_KINDS = ("text", "table", "image")
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml", ".webp": "image/webp"}  # fmt: skip
FIGURES_DIR = "figures"  # where images from outside out_dir are copied for the Markdown report
SHOWN_TITLE = "What this run shows at this scale"
NOT_SHOWN_TITLE = "What it does not show"


# --- validation ------------------------------------------------------------------------------


def _fail(where: str, msg: str) -> EffilmError:
    return EffilmError(f"report{where}: {msg}")


def _str(v, where: str) -> str:
    if not isinstance(v, str):
        raise _fail(where, f"expected text, got {type(v).__name__}")
    return v


def _unknown(d: dict, allowed, where: str) -> None:
    for key in d:
        if key not in allowed:
            near = closest(str(key), allowed)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise _fail(where, f"unknown key {key!r}{hint}; expected {', '.join(allowed)}")


def _block(b, where: str, out_dir: Path) -> tuple[str, object]:
    if isinstance(b, str):
        return "text", b
    if not isinstance(b, dict) or len(b) != 1:
        raise _fail(where, f"a block is a string or a dict with one key of {', '.join(BLOCK_KINDS)}")
    _unknown(b, BLOCK_KINDS, where)
    kind, v = next(iter(b.items()))
    if kind == "text":
        return kind, _str(v, f"{where}.text")
    if kind == "table":
        return kind, _table(v, f"{where}.table")
    return kind, _image(v, f"{where}.image", out_dir)


def _table(t, where: str) -> dict:
    if not isinstance(t, dict):
        raise _fail(where, "expected a dict with headers and rows")
    _unknown(t, ("headers", "rows", "caption"), where)
    headers, rows = t.get("headers"), t.get("rows")
    if not isinstance(headers, list) or not headers:
        raise _fail(f"{where}.headers", "expected a non-empty list of column names")
    if not isinstance(rows, list):
        raise _fail(f"{where}.rows", "expected a list of rows")
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != len(headers):
            n = len(row) if isinstance(row, (list, tuple)) else type(row).__name__
            raise _fail(f"{where}.rows[{i}]", f"has {n} cells for {len(headers)} headers")
        for j, cell in enumerate(row):
            if cell is not None and not isinstance(cell, (str, int, float, bool)):
                raise _fail(f"{where}.rows[{i}][{j}]", f"a cell is text, a number or null, not {type(cell).__name__}")
    return {"headers": [str(h) for h in headers], "rows": [list(r) for r in rows], "caption": t.get("caption")}


def _image(im, where: str, out_dir: Path) -> dict:
    if not isinstance(im, dict) or "path" not in im:
        raise _fail(where, "expected a dict with a path")
    _unknown(im, ("path", "caption", "alt"), where)
    path = Path(_str(im["path"], f"{where}.path"))
    path = path if path.is_absolute() else out_dir / path
    if path.suffix.lower() not in IMAGE_TYPES:
        raise _fail(f"{where}.path", f"{path}: not an image type the report embeds ({', '.join(IMAGE_TYPES)})")
    if not path.is_file():
        raise _fail(f"{where}.path", f"{path}: no such image")
    caption = im.get("caption") or ""
    return {"path": path, "caption": caption, "alt": im.get("alt") or caption or path.stem}


def validate(report: dict, out_dir: Path) -> dict:
    """Check ``report`` against the schema; returns it normalised (blocks as ``(kind, value)``)."""
    if not isinstance(report, dict):
        raise _fail("", f"expected a dict, got {type(report).__name__}")
    _unknown(report, REPORT_KEYS, "")
    if "title" not in report:
        raise _fail("", "has no 'title'")
    out = {"title": _str(report["title"], ".title"), "subtitle": _str(report.get("subtitle", ""), ".subtitle")}
    info = report.get("run_info") or {}
    if not isinstance(info, dict):
        raise _fail(".run_info", "expected a dict of label: value")
    out["run_info"] = info
    timings = report.get("timings") or []
    for i, t in enumerate(timings):
        if not isinstance(t, dict) or not isinstance(t.get("stage"), str) or not is_number(t.get("seconds")):
            raise _fail(f".timings[{i}]", 'expected {"stage": str, "seconds": number}')
        _unknown(t, ("stage", "seconds"), f".timings[{i}]")
    out["timings"] = timings
    sections = report.get("sections")
    if not isinstance(sections, list):
        raise _fail(".sections", "expected a list of sections")
    out["sections"] = []
    for i, s in enumerate(sections):
        where = f".sections[{i}]"
        if not isinstance(s, dict):
            raise _fail(where, "expected a dict with title and blocks")
        _unknown(s, ("title", "blocks"), where)
        blocks = s.get("blocks", [])
        if not isinstance(blocks, list):
            raise _fail(f"{where}.blocks", "expected a list")
        out["sections"].append({
            "title": _str(s.get("title"), f"{where}.title"),
            "blocks": [_block(b, f"{where}.blocks[{j}]", out_dir) for j, b in enumerate(blocks)],
        })  # fmt: skip
    notes = report.get("scale_notes") or {}
    if not isinstance(notes, dict):
        raise _fail(".scale_notes", "expected a dict with 'shown' and 'not_shown' lists")
    _unknown(notes, ("shown", "not_shown"), ".scale_notes")
    for key in ("shown", "not_shown"):
        items = notes.get(key, [])
        if not isinstance(items, list):
            raise _fail(f".scale_notes.{key}", "expected a list of text")
        for j, x in enumerate(items):
            _str(x, f".scale_notes.{key}[{j}]")
    out["scale_notes"] = notes
    return out


# --- shared pieces ---------------------------------------------------------------------------


def format_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    return f"{m} min {sec:02d} s"


def timings_table(timings: list[dict]) -> dict:
    total = sum(t["seconds"] for t in timings)
    rows = [[t["stage"], format_seconds(t["seconds"]), f"{100 * t['seconds'] / total:.0f}%" if total else "—"]
            for t in timings]  # fmt: skip
    return {"headers": ["stage", "time", "share"], "rows": rows, "caption": None, "total": ["total", format_seconds(total), "100%"]}


def _numeric_columns(t: dict) -> list[bool]:
    cols = list(zip(*t["rows"])) if t["rows"] else [() for _ in t["headers"]]
    return [bool(c) and all(v is None or is_quantity(v) for v in c) and any(is_quantity(v) for v in c) for c in cols]


# --- Markdown --------------------------------------------------------------------------------


def _md_cell(v) -> str:
    return format_cell(v).replace("|", "\\|").replace("\n", " ")


def _md_table(t: dict) -> str:
    num = _numeric_columns(t)
    lines = []
    if t.get("caption"):
        lines += [f"*{t['caption']}*", ""]
    lines.append("| " + " | ".join(_md_cell(h) for h in t["headers"]) + " |")
    lines.append("|" + "|".join("---:" if n else "---" for n in num) + "|")
    for row in [*t["rows"], *([t["total"]] if t.get("total") else [])]:
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _md_image(im: dict, out_dir: Path, copies: dict) -> str:
    path = im["path"].resolve()
    try:
        rel = path.relative_to(out_dir.resolve())
    except ValueError:
        rel = copies.get(path)
        if rel is None:
            rel = Path(FIGURES_DIR) / f"{len(copies)}-{path.name}"
            copies[path] = rel
    alt = im["alt"].replace("]", "\\]")
    text = f"![{alt}]({rel.as_posix()})"
    return f"{text}\n\n*{im['caption']}*" if im["caption"] else text


def render_markdown(rep: dict, out_dir: Path, copies: dict) -> str:
    parts = [f"# {rep['title']}"]
    if rep["subtitle"]:
        parts.append(f"*{rep['subtitle']}*")
    if rep["run_info"]:
        parts.append("\n".join(f"- **{k}**: {format_cell(v)}" for k, v in rep["run_info"].items()))
    if rep["timings"]:
        parts += ["## Timings", _md_table(timings_table(rep["timings"]))]
    for s in rep["sections"]:
        parts.append(f"## {s['title']}")
        for kind, v in s["blocks"]:
            parts.append(v.strip() if kind == "text" else _md_table(v) if kind == "table" else _md_image(v, out_dir, copies))
    notes = rep["scale_notes"]
    if notes.get("shown") or notes.get("not_shown"):
        parts.append("## At this scale")
        for key, title in (("shown", SHOWN_TITLE), ("not_shown", NOT_SHOWN_TITLE)):
            if notes.get(key):
                parts += [f"### {title}", "\n".join(f"- {x}" for x in notes[key])]
    return "\n\n".join(parts) + "\n"


# --- HTML ------------------------------------------------------------------------------------


def _html_table(t: dict) -> str:
    num = _numeric_columns(t)
    cls = [' class="num"' if n else "" for n in num]
    out = ["<table>"]
    if t.get("caption"):
        out.append(f"<caption>{inline_html(t['caption'])}</caption>")
    out.append("<thead><tr>" + "".join(f"<th{c}>{inline_html(h)}</th>" for h, c in zip(t["headers"], cls)) + "</tr></thead>")
    out.append("<tbody>")
    for row in t["rows"]:
        out.append("<tr>" + "".join(f"<td{c}>{inline_html(format_cell(v))}</td>" for v, c in zip(row, cls)) + "</tr>")
    if t.get("total"):
        out.append('<tr class="total">' + "".join(f"<td{c}>{html.escape(format_cell(v))}</td>" for v, c in zip(t["total"], cls)) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def data_uri(path: Path) -> str:
    mime = IMAGE_TYPES[path.suffix.lower()]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _html_image(im: dict) -> str:
    cap = f"\n<figcaption>{inline_html(im['caption'])}</figcaption>" if im["caption"] else ""
    alt = html.escape(im["alt"], quote=True)
    return f'<figure>\n<img src="{data_uri(im["path"])}" alt="{alt}">{cap}\n</figure>'


def render_html(rep: dict) -> str:
    body = [f"<h1>{inline_html(rep['title'])}</h1>"]
    if rep["subtitle"]:
        body.append(f'<p class="subtitle">{inline_html(rep["subtitle"])}</p>')
    if rep["run_info"]:
        items = "".join(f"<dt>{inline_html(str(k))}</dt><dd>{inline_html(format_cell(v))}</dd>" for k, v in rep["run_info"].items())
        body.append(f'<dl class="info">{items}</dl>')
    if rep["timings"]:
        body += ["<h2>Timings</h2>", _html_table(timings_table(rep["timings"]))]
    for s in rep["sections"]:
        body.append(f"<section>\n<h2>{inline_html(s['title'])}</h2>")
        for kind, v in s["blocks"]:
            body.append(text_html(v) if kind == "text" else _html_table(v) if kind == "table" else _html_image(v))
        body.append("</section>")
    notes = rep["scale_notes"]
    if notes.get("shown") or notes.get("not_shown"):
        body.append('<section class="scale">\n<h2>At this scale</h2>')
        for key, title in (("shown", SHOWN_TITLE), ("not_shown", NOT_SHOWN_TITLE)):
            if notes.get(key):
                body.append(f"<h3>{title}</h3>\n<ul>\n" + "".join(f"<li>{inline_html(x)}</li>\n" for x in notes[key]) + "</ul>")
        body.append("</section>")
    return PAGE.substitute(title=html.escape(rep["title"]), css=CSS, body="\n".join(body))


def render_report(report: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Validate ``report`` (schema in the module docstring) and write ``report.md`` and
    ``report.html`` into ``out_dir``. Returns ``(md_path, html_path)``."""
    out_dir = Path(out_dir)
    rep = validate(report, out_dir)  # every image is checked before anything is written
    copies: dict[Path, Path] = {}
    md = render_markdown(rep, out_dir, copies)
    page = render_html(rep)
    for src, rel in copies.items():
        atomic_write_bytes(out_dir / rel, src.read_bytes())
    atomic_write_text(out_dir / "report.md", md)
    atomic_write_text(out_dir / "report.html", page)
    return out_dir / "report.md", out_dir / "report.html"


# --- the cost table --------------------------------------------------------------------------


def model_cost_table(models, seq_len: int | None = None) -> dict:
    """A table block comparing models: total and active parameters, forward FLOPs per token at
    ``seq_len`` (each model's own max_seq_len when None), weight memory (bf16, int4) and KV cache
    per token (bf16). ``models`` holds preset names, ``ModelConfig`` objects or model-config dicts."""
    from effilm.config.cost import cost_summary, human_bytes, human_count
    from effilm.config.model import ModelConfig

    rows = []
    for m in models:
        cfg = ModelConfig.from_name(m) if isinstance(m, str) else ModelConfig.from_dict(m) if isinstance(m, dict) else m
        if not isinstance(cfg, ModelConfig):
            raise EffilmError(f"model_cost_table: expected a preset name, ModelConfig or dict, got {type(m).__name__}")
        c = cost_summary(cfg, seq_len)
        rows.append([
            cfg.name, f"{c['layers']} × {c['layer_pattern']}", human_count(c["total_params"]), human_count(c["active_params"]),
            f"{100 * c['active_params'] / c['total_params']:.0f}%", human_count(c["flops_per_token"]),
            human_bytes(c["weight_bytes"]["bf16"]), human_bytes(c["weight_bytes"]["int4"]),
            human_bytes(c["kv_cache_bytes_per_token"]["bf16"]),
        ])  # fmt: skip
    ctx = f"a {seq_len}-token context" if seq_len else "each model's full context"
    return {
        "headers": ["model", "layers × pattern", "total params", "active params", "active share",
                    "forward FLOPs / token", "weights bf16", "weights int4", "KV cache / token bf16"],
        "rows": rows,
        "caption": f"Cost per model, computed analytically (effilm.config.cost); FLOPs over {ctx}, "
                   "2 FLOPs per multiply-add; int4 excludes quantization scales.",
    }  # fmt: skip
