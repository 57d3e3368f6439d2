"""The demo report: schema checks, Markdown and self-contained HTML, the cost table, the browser check."""

import base64
import html.parser
import os
import subprocess
import sys

import pytest
import torch
from plot_fixtures import make_run
from repo import REPO

from effilm.config import ModelConfig
from effilm.errors import ConfigError, EffilmError
from effilm.reports.markup import format_cell, inline_html, is_quantity, text_html
from effilm.reports.plots import PlotConfig, plot_runs
from effilm.reports.render import model_cost_table, render_report

ROOT = REPO
SCRIPT = ROOT / "scripts" / "screenshot_report.py"
VOID = {"meta", "img", "br", "hr", "link", "input"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class Checker(html.parser.HTMLParser):
    """Well-formedness: every non-void tag closed in order; collects tags, images and table cells."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.imgs, self.tags, self.cells, self.text = [], [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self.stack and self.stack[-1] in ("td", "th"):
            self.cells.append(data)


def parse(page: str) -> Checker:
    c = Checker()
    c.feed(page)
    c.close()
    assert not c.errors and not c.stack, (c.errors, c.stack)
    return c


def sample_report(tmp_path) -> dict:
    dense, arctic = make_run(tmp_path / "runs", "tiny-dense"), make_run(tmp_path / "runs", "tiny-arctic")
    out = tmp_path / "report"
    plot_runs([dense, arctic], out / "plots", PlotConfig(dpi=40))
    return {
        "title": "effilm demo <quick>",
        "subtitle": "Three tiny models on procedural data, **2-core CPU**",
        "run_info": {"command": "effilm demo --quick", "seed": 0, "torch": torch.__version__},
        "timings": [{"stage": "synthesize", "seconds": 12.5}, {"stage": "train", "seconds": 130.0}],
        "sections": [
            {"title": "Training", "blocks": [
                "Loss against tokens and against *active* FLOPs; see `effilm plot`.",
                {"image": {"path": "plots/compare_loss.png", "caption": "dense vs hybrid"}},
                {"image": {"path": str(out / "plots" / "tiny-arctic" / "expert_load.png"), "caption": "load"}},
            ]},
            {"title": "Cost", "blocks": [{"table": model_cost_table(["tiny-dense", "tiny-arctic", "arctic"], 512)}]},
            {"title": "Quiz", "blocks": [
                {"text": "Scores:\n\n- cloze beats chance\n- letter scoring is at chance <sadly>"},
                {"table": {"headers": ["model", "cloze acc", "letter acc", "contaminated"],
                           "rows": [["tiny-dense", 0.5312, 0.25, False], ["tiny-arctic", 0.6, None, False]],
                           "caption": "accuracy | 3 seeds"}},
            ]},
            {"title": "Images from elsewhere", "blocks": [{"image": {"path": str(dense.parent.parent / "ext.png")}}]},
        ],
        "scale_notes": {"shown": ["the pipeline runs end to end"], "not_shown": ["MoE *wins* at scale"]},
    }


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The sample report rendered once (drawing its plots is the slow part)."""
    torch.set_num_threads(1)
    tmp_path = tmp_path_factory.mktemp("report")
    report = sample_report(tmp_path)
    (tmp_path / "ext.png").write_bytes((tmp_path / "report" / "plots" / "tiny-dense" / "loss.png").read_bytes())
    return tmp_path, render_report(report, tmp_path / "report")


def test_render_sample_report(rendered):
    tmp_path, (md_path, html_path) = rendered
    out, ext = tmp_path / "report", tmp_path / "ext.png"
    page = html_path.read_text()
    c = parse(page)
    # images are embedded, byte for byte, with their alt text
    assert len(c.imgs) == 3 and all(i["src"].startswith("data:image/png;base64,") for i in c.imgs)
    embedded = base64.b64decode(c.imgs[0]["src"].split(",", 1)[1])
    assert embedded == (out / "plots" / "compare_loss.png").read_bytes()
    assert c.imgs[0]["alt"] == "dense vs hybrid" and c.imgs[2]["alt"] == "ext"
    assert "src=\"plots/" not in page and "file:" not in page  # opens from disk, nothing external
    # tables: timings with total, cost, quiz; numbers right-aligned; text escaped, not interpreted
    assert c.tags.count("table") == 3
    for cell in ("total", "2 min 22 s", "12.5 s", "91%", "tiny-arctic", "0.5312", "—", "no", "accuracy | 3 seeds"):
        assert cell in "".join(c.text), cell
    assert '<td class="num">0.5312</td>' in page
    assert "&lt;quick&gt;" in page and "&lt;sadly&gt;" in page and "<quick>" not in page
    assert "<strong>2-core CPU</strong>" in page and "<em>active</em>" in page and "<code>effilm plot</code>" in page
    assert "<li>cloze beats chance</li>" in page and '<section class="scale">' in page
    # Markdown: headings, pipe tables with escaped pipes, images by relative path
    md = md_path.read_text()
    assert md.startswith("# effilm demo <quick>\n")
    assert "## Training" in md and "## At this scale" in md and "### What it does not show" in md
    assert "![dense vs hybrid](plots/compare_loss.png)" in md
    assert "![load](plots/tiny-arctic/expert_load.png)" in md
    assert "![ext](figures/0-ext.png)" in md and (out / "figures" / "0-ext.png").read_bytes() == ext.read_bytes()
    assert "| model | cloze acc | letter acc | contaminated |\n|---|---:|---:|---|" in md
    assert "| tiny-arctic | 0.6 | — | no |" in md and "*accuracy | 3 seeds*" in md
    assert "| total | 2 min 22 s | 100% |" in md
    assert "| stage | time | share |\n|---|---:|---:|" in md  # quantities with units align right too
    assert "| model | layers × pattern | total params |" in md and "|---|---|" + "---:|" * 7 in md
    for line in md.splitlines():  # every table row has as many cells as its header
        if line.startswith("| model | cloze"):
            n = line.count(" | ")
        if line.startswith("| tiny-dense | 0.5312"):
            assert line.count(" | ") == n


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"titel": "x"}, r"report: unknown key 'titel' \(did you mean 'title'\?\)"),
        ({"sections": [{"title": "a", "blocks": [{"tabel": {}}]}]}, r"sections\[0\]\.blocks\[0\]: unknown key 'tabel'"),
        ({"sections": [{"title": "a", "blocks": [{"table": {"headers": ["a", "b"], "rows": [[1]]}}]}]},
         r"sections\[0\]\.blocks\[0\]\.table\.rows\[0\]: has 1 cells for 2 headers"),
        ({"sections": [{"title": "a", "blocks": [{"image": {"path": "nope.png"}}]}]}, r"nope.png: no such image"),
        ({"sections": [{"title": "a", "blocks": [{"image": {"path": "x.bmp"}}]}]}, r"not an image type"),
        ({"timings": [{"stage": "a", "seconds": "1"}]}, r"timings\[0\]"),
        ({"scale_notes": {"shown": [1]}}, r"scale_notes\.shown\[0\]: expected text"),
    ],
)
def test_bad_reports_are_clear_errors_and_write_nothing(tmp_path, patch, match):
    report = {"title": "t", "sections": [], **patch}
    with pytest.raises(EffilmError, match=match):
        render_report(report, tmp_path)
    assert not list(tmp_path.iterdir())


def test_markup_escapes_and_links():
    assert inline_html("a < b & `x<y>` **b**") == "a &lt; b &amp; <code>x&lt;y&gt;</code> <strong>b</strong>"
    assert inline_html("[docs](https://x.org/a?b=1&c=2)") == '<a href="https://x.org/a?b=1&amp;c=2">docs</a>'
    assert "<a" not in inline_html("[x](javascript:alert(1))")
    assert inline_html('[q"](docs/A.md)') == '<a href="docs/A.md">q&quot;</a>'
    assert inline_html("2 * 3 * 4 and **not closed") == "2 * 3 * 4 and **not closed"
    assert text_html("one\ntwo\n\n- a\n- b\nthree") == "<p>one two</p>\n<ul>\n<li>a</li>\n<li>b</li>\n</ul>\n<p>three</p>"
    assert [is_quantity(v) for v in ("2.508M", "4.78 MiB", "91%", "2 min 10 s", "1e-3", "4 × D", "tiny", "no")] == [
        True, True, True, True, True, False, False, False]  # fmt: skip
    assert [format_cell(v) for v in (1234567, 0.123456, None, True, float("nan"), "s")] == [
        "1,234,567", "0.1235", "—", "yes", "—", "s"]  # fmt: skip


def test_model_cost_table():
    t = model_cost_table(["tiny-dense", "tiny-arctic", ModelConfig.from_name("arctic"), ModelConfig.from_name("openelm-270m").to_dict()], 512)
    assert len(t["headers"]) == len(t["rows"][0]) == 9 and "512-token" in t["caption"]
    rows = {r[0]: dict(zip(t["headers"], r)) for r in t["rows"]}
    dense, hybrid, arctic = rows["tiny-dense"], rows["tiny-arctic"], rows["arctic"]
    num = {"K": 1e3, "M": 1e6, "B": 1e9}
    active = [float(r["active params"][:-1]) * num[r["active params"][-1]] for r in (dense, hybrid)]
    total = float(hybrid["total params"][:-1]) * num[hybrid["total params"][-1]]
    assert abs(active[0] - active[1]) / active[0] < 0.02 and total > 5 * active[1]  # equal active, more in all
    assert dense["active share"] == "100%" and arctic["total params"].startswith("478.")
    assert arctic["active params"].startswith("17.3") and arctic["layers × pattern"] == "35 × H"
    assert rows["openelm-270m"]["total params"].startswith("271.")
    with pytest.raises(ConfigError, match="did you mean"):
        model_cost_table(["arctc"])


def _chromium():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from screenshot_report import find_browser
    finally:
        sys.path.pop(0)
    return find_browser()


@pytest.mark.skipif(_chromium() is None, reason="no Chromium binary (apt-get install chromium)")
def test_report_renders_in_headless_chromium(rendered, tmp_path):
    import matplotlib.image

    _, (_, page) = rendered
    shot = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(page), str(shot), "--width", "1000", "--height", "1600"],
                          capture_output=True, text=True, timeout=180, env=dict(os.environ))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    img = matplotlib.image.imread(shot)
    assert img.shape[:2] == (1600, 1000)
    gray = img[..., :3].mean(axis=2)
    assert gray.std() > 0.05  # text, tables and plots, not a blank page
    assert (gray < 0.5).mean() > 0.002  # some dark pixels: the text rendered
    # the top band holds the title: dark pixels there, white margin on the far left
    assert (gray[:120] < 0.5).any() and gray[:, :20].min() > 0.9


def test_screenshot_script_without_a_browser_is_a_clear_error(tmp_path):
    env = dict(os.environ, CHROMIUM=str(tmp_path / "no-such-browser"))
    (tmp_path / "r.html").write_text("<p>x</p>")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "r.html"), str(tmp_path / "o.png")],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "no Chromium found" in proc.stderr and not (tmp_path / "o.png").exists()
