"""`effilm demo`: the quick run end to end through the CLI, the config rules, the notes, the slow 3-seed target."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo import CONFIGS, SCRIPTS
from repo import SRC as SRC_DIR

from effilm.demo.config import MODEL_NAMES, DemoConfig
from effilm.demo.notes import build_notes
from effilm.demo.run import STAGES, missing_modules, run_pipeline
from effilm.errors import ConfigError

SRC = str(SRC_DIR)
sys.path.insert(0, str(SCRIPTS))
import screenshot_report  # noqa: E402


def _effilm(*args, check=True, cwd=None):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "effilm", *args], capture_output=True, text=True, env=env,
                          timeout=900, cwd=cwd)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"effilm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``effilm demo --quick`` exactly as `make demo-quick` runs it: the default output folder, in an
    empty working directory (the same code path as `make demo`, shorter)."""
    cwd = tmp_path_factory.mktemp("empty")
    proc = _effilm("demo", "--quick", cwd=cwd)
    out = cwd / "demo_out"
    assert sorted(p.name for p in cwd.iterdir()) == ["demo_out"]
    return out, proc.stdout, json.loads((out / "summary.json").read_text())


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ----- the quick run, end to end -----------------------------------------------------------------
def test_quick_summary_structure_and_timings(quick):
    out, stdout, s = quick
    assert s["schema_version"] == 1 and s["quick"] is True and s["seed"] == 0
    for name in STAGES:
        t = s["timings"][name]
        assert t["wall_s"] >= 0 and t["cpu_s"] >= 0, name
        assert f"== {STAGES.index(name) + 1}. {name} ==" in stdout
    assert s["timings"]["train"]["cpu_s"] > 0 and s["timings"]["total"]["cpu_s"] >= s["timings"]["train"]["cpu_s"]
    assert set(s["train"]) == set(s["evaluate"]) == set(MODEL_NAMES)
    assert {n["topic"] for n in s["notes"]} >= {"cloze_vs_chance", "textbook_vs_web", "moe_vs_dense",
                                                  "letter_scoring", "decontamination", "scale"}
    assert "== what this shows ==" in stdout
    assert set(s["costs"]) == {"arctic", "phi-3-mini-4k", "openelm-270m"}


def test_quick_data_stats_match_the_files(quick):
    out, _, s = quick
    syn = s["synthesize"]
    for name, st in syn["corpora"].items():
        recs = _jsonl(st["path"])
        assert len(recs) == st["documents"] and sum(len(r["text"]) for r in recs) == st["chars"], name
    quiz = _jsonl(syn["quiz"]["path"])
    assert len(quiz) == syn["quiz"]["items"] == syn["facts"]["count"]
    assert syn["quiz"]["chance"] == 1 / len(quiz[0]["choices"])
    for name, c in s["clean"]["corpora"].items():
        assert len(_jsonl(s["clean"]["paths"][name])) == c["output_documents"] <= c["input_documents"]
        assert c["decontam"]["after_cleaning"]["contaminated"] == 0
    for name, d in s["tokenize"]["datasets"].items():
        manifest = json.loads((Path(d["path"]) / "manifest.json").read_text())
        assert manifest["tokens"] == d["tokens"] and manifest["documents"] == d["documents"], name


def test_quick_planted_leaks_found_exactly(quick):
    _, _, s = quick
    pl = s["clean"]["planted_leak_check"]
    assert pl["exact"] and not pl["missed"] and not pl["false_positives"]
    assert sorted(p["item"] for p in pl["planted"]) == pl["found_items"]
    assert len(pl["planted"]) == DemoConfig.quick().planted_leaks
    # the leaks really are in the copy (one of them re-cased) and not in the corpus the models read
    copy = Path(pl["corpus_copy"]).read_text(encoding="utf-8").lower()
    cleaned = Path(s["clean"]["paths"]["textbook"]).read_text(encoding="utf-8").lower()
    for p in pl["planted"]:
        assert p["text"].lower() in copy and p["text"].lower() not in cleaned
    assert any(p["text"].isupper() for p in pl["planted"])
    assert pl["confirm_threshold"] == 0.5 and pl["window_words"] == 0 and pl["slot_words"] == 3  # the defaults
    # the matched fraction alone finds the planted items and confirms template-mates too (recorded)
    without = pl["without_distinguishing_words"]
    assert not without["missed"] and without["false_positives"] and not without["exact"]


def test_quick_models_equal_budgets_and_active_params(quick):
    _, _, s = quick
    tr = s["train"]
    assert len({t["tokens"] for t in tr.values()}) == 1
    dense, arctic = tr["dense-textbook"], tr["arctic-textbook"]
    assert abs(arctic["active_params"] - dense["active_params"]) / dense["active_params"] < 0.02
    assert arctic["total_params"] > 3 * dense["total_params"]
    assert [st["name"] for st in tr["dense-web"]["stages"]] == ["web"]
    assert [st["name"] for st in dense["stages"]] == ["web", "textbook"] == [st["name"] for st in arctic["stages"]]
    for name, t in tr.items():
        records = [r for r in _jsonl(Path(t["run_dir"]) / "metrics.jsonl") if r["kind"] == "train"]
        assert records[-1]["tokens"] == t["tokens"] and records[-1]["step"] == t["steps"], name
        assert math.isfinite(t["final_loss"]) and t["final_loss"] < t["first_loss"], name
        assert (Path(t["final_dir"]) / "tokenizer.json").is_file()


def test_quick_posttrain_stage(quick):
    from effilm.eval.chat import exact_match

    out, stdout, s = quick
    pt, tr = s["posttrain"], s["train"]
    sft, dpo = pt["runs"]["sft"], pt["runs"]["dpo"]
    assert pt["from"] == "dense-textbook" and sft["init_from"] == tr["dense-textbook"]["final_dir"]
    assert dpo["init_from"] == sft["final_dir"]
    for kind, run in pt["runs"].items():
        cfg = json.loads((Path(run["run_dir"]) / "config.json").read_text())
        assert cfg["train"]["objective"] == kind and cfg["model"]["init_from"] == run["init_from"]
        assert math.isfinite(run["final_loss"]) and run["final_loss"] < run["first_loss"], kind
    assert (Path(dpo["run_dir"]) / "reference_logps.safetensors").is_file()
    assert set(dpo["last"]) == {"rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"}
    for kind, d in pt["data"].items():
        assert d["contaminated"] == 0 and d["records"] == len(_jsonl(d["source"])), kind
        assert json.loads((Path(d["path"]) / "manifest.json").read_text())["tokens"] == d["tokens"]
    n = s["synthesize"]["quiz"]["items"]
    for e in pt["evaluate"].values():
        items = json.loads(Path(e["reports"]["chat"]).read_text())["tasks"][0]["items"]
        assert len(items) == n == e["chat_exact_match"]["n"]
        assert all(it["correct"] == exact_match(it["output"], it["answers"]) for it in items)
        assert e["chat_exact_match"]["acc"] == pytest.approx(sum(it["correct"] for it in items) / n)
        assert sum(e["predicted_letters"].values()) == n
    tr_ = pt["transcript"]
    assert tr_["status"] == "done" and len(tr_["turns"]) == 2 and tr_["server_exit"] == 0
    # the served chat endpoint answers as the chat-form evaluation of the same model did (both greedy)
    items = json.loads(Path(pt["evaluate"]["dpo"]["reports"]["chat"]).read_text())["tasks"][0]["items"]
    for turn, it in zip(tr_["turns"], items, strict=False):
        assert turn["messages"][-1]["content"] == it["question"] and turn["reply"] == it["output"]
    assert {"posttrain_chat", "posttrain_letter"} <= {n["topic"] for n in s["notes"]}
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Post-training: the chat model" in md and tr_["turns"][0]["messages"][-1]["content"] in md
    assert (out / "plots/dpo/rewards.png").is_file() and (out / "plots/sft/loss.png").is_file()


def test_quick_eval_matches_the_reports(quick):
    _, _, s = quick
    n = s["synthesize"]["quiz"]["items"]
    for name, e in s["evaluate"].items():
        for scoring in ("letter", "cloze"):
            items = json.loads(Path(e["reports"][scoring]).read_text())["tasks"][0]["items"]
            assert len(items) == n == e[scoring]["n"]
            assert e[scoring]["acc"] == pytest.approx(sum(r["correct"] for r in items) / n), (name, scoring)
        assert sum(e["predicted_letters"].values()) == n
        assert all(0 < v < 20 for v in e["bits_per_byte"].values())
        assert e["contamination"]["contaminated"] == 0 and e["chance"] == 0.25
    assert s["evaluate"]["dense-web"]["trained_on"] == ["web"]
    assert s["evaluate"]["dense-textbook"]["trained_on"] == ["textbook", "web"]


def test_quick_hooks_are_skipped_visibly(quick, tmp_path, monkeypatch, capsys):
    import effilm.demo.run as run

    _, _, s = quick  # the dev install has every extra: both late stages ran
    assert s["ship"]["status"] == "done" and s["report"]["status"] == "written"
    # without an extra's package, the stage is skipped, says which package is missing, and returns
    for hook, missing in ((run.ship, ["gguf"]), (run.report, ["matplotlib"])):
        name = hook.__name__
        monkeypatch.setattr(run, "missing_modules", lambda names, missing=missing: [n for n in names if n in missing])
        args = (s, tmp_path, DemoConfig.quick(), True) if name == "ship" else (s, tmp_path)
        assert hook(*args) == {"status": "not available", "missing": missing}
        assert f"{name}: not available (missing {missing[0]})" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # nothing was written by the skipped stages


def _imgs(page: str) -> list[str]:
    import html.parser

    class Imgs(html.parser.HTMLParser):
        srcs: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.srcs.append(dict(attrs)["src"])

    p = Imgs()
    p.srcs = []
    p.feed(page)
    return p.srcs


def assert_report_shows_every_image(report_dir: Path) -> None:
    """Every <img> of report.html and every image link of report.md resolves from the report's own
    folder (data: URIs decode to an image), and, where Chromium is installed, every image of the
    HTML loads in a real browser (natural width > 0) started from another working directory."""
    import base64

    page = (report_dir / "report.html").read_text(encoding="utf-8")
    srcs = _imgs(page)
    assert srcs, "the report shows no image"
    for src in srcs:
        if src.startswith("data:image/png;base64,"):
            assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert not src.startswith(("/", "file:")) and (report_dir / src).is_file(), src
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (report_dir / "report.md").read_text(encoding="utf-8"))
    assert len(links) == len(srcs)
    for link in links:
        assert not link.startswith("/") and (report_dir / link).is_file(), link
    browser = screenshot_report.find_browser()
    if browser is None:
        assert os.environ.get("CI") != "true", "CI installs Chromium for this check"
        return
    widths = screenshot_report.image_widths(report_dir / "report.html", browser)
    assert len(widths) == len(srcs) and all(w > 0 for w in widths), widths


def test_quick_report_shows_every_image_from_anywhere(quick, tmp_path):
    out, stdout, s = quick
    assert s["report"]["status"] == "written" and Path(s["report"]["html"]) == out / "report.html"
    assert_report_shows_every_image(out)
    moved = tmp_path / "moved here" / "copy of demo_out"  # a report mailed or moved elsewhere
    shutil.copytree(out, moved)
    assert_report_shows_every_image(moved)


def test_relative_out_with_dotdot_and_spaces(tmp_path):
    cwd = tmp_path / "a work dir" / "sub"
    cwd.mkdir(parents=True)
    _effilm("demo", "--quick", "--out", "../my out/demo", cwd=cwd)
    assert list(cwd.iterdir()) == []
    assert_report_shows_every_image(tmp_path / "a work dir" / "my out" / "demo")


def test_missing_modules():
    assert missing_modules(["effilm.demo.run", "effilm.no_such_module", "no_such_pkg.sub"]) == [
        "effilm.no_such_module", "no_such_pkg.sub"]


def test_out_that_is_a_file_is_one_clear_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    p = _effilm("demo", "--quick", "--out", str(f), check=False)
    assert p.returncode == 2 and "--out" in p.stderr and "Traceback" not in p.stderr
    p = _effilm("demo", "--quick", "--out", str(tmp_path / "o"), "--seed", "-1", check=False)
    assert p.returncode == 2 and "demo.seed" in p.stderr and "Traceback" not in p.stderr


# ----- config and notes ------------------------------------------------------------------------
def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"demo\.num_experts"):
        DemoConfig(num_experts=2)
    with pytest.raises(ConfigError, match=r"demo\.web_stage_fraction"):
        DemoConfig(web_stage_fraction=1.0)
    with pytest.raises(ConfigError, match=r"demo\.train_tokens"):
        DemoConfig(train_tokens=0)


def test_run_configs_equal_tokens_and_shapes(tmp_path):
    from effilm.config.run import RunConfig

    cfg = DemoConfig()
    runs = {m: RunConfig.from_dict(cfg.run_dict(m, str(tmp_path / m), "tok", {"web": "w", "textbook": "t"}))
            for m in MODEL_NAMES}
    budgets = {m: sum(s.tokens for s in r.data.stages) for m, r in runs.items()}
    assert len(set(budgets.values())) == 1 and budgets["dense-web"] >= cfg.train_tokens
    web = runs["dense-textbook"].data.stages[0].tokens / budgets["dense-textbook"]
    assert abs(web - cfg.web_stage_fraction) < 0.01
    d, a = runs["dense-textbook"].model, runs["arctic-textbook"].model
    assert abs(a.num_active_params() - d.num_active_params()) / d.num_active_params() < 0.02
    assert a.num_params() > 3 * d.num_params() and a.layer_pattern == "H" and d.layer_pattern == "D"


def _fake_summary(tb: float, web: float, ar: float, se: float = 0.04) -> dict:
    def ev(acc):
        return {"cloze": {"acc": acc, "stderr": se}, "letter": {"acc": 0.25, "stderr": se},
                "bits_per_byte": {"heldout_textbook": 2.0 - acc}, "predicted_letters": {"A": 90, "B": 10}}

    def tr(total):
        return {"tokens": 1000, "active_params": 100, "total_params": total, "cpu_s": 10.0}

    leak = {"planted": [1, 2], "found_items": ["a", "b"], "missed": [], "false_positives": [], "exact": True,
            "confirm_threshold": 0.5, "window_words": 0, "without_distinguishing_words": {"false_positives": ["c"]}}
    return {"evaluate": {"dense-web": ev(web), "dense-textbook": ev(tb), "arctic-textbook": ev(ar)},
            "train": {"dense-web": tr(100), "dense-textbook": tr(100), "arctic-textbook": tr(400)},
            "synthesize": {"quiz": {"chance": 0.25, "items": 100}, "facts": {"count": 100}},
            "clean": {"planted_leak_check": leak,
                      "corpora": {"web": {"decontam": {"after_cleaning": {"contaminated": 0}}}}}}


def test_notes_report_either_way():
    up = {n["topic"]: n for n in build_notes(_fake_summary(0.8, 0.3, 0.95), 2.0, 0.5)}
    assert up["textbook_vs_web"]["shows"] and " beat the web-only" in up["textbook_vs_web"]["text"]
    assert up["moe_vs_dense"]["shows"] and "MoE ahead" in up["moe_vs_dense"]["text"]
    assert up["cloze_vs_chance"]["shows"] and "met on this seed" in up["cloze_vs_chance"]["text"]
    assert not up["letter_scoring"]["shows"] and "none clearly above chance" in up["letter_scoring"]["text"]
    assert "takes 90.0%, 90.0%, 90.0%" in up["letter_scoring"]["text"]
    assert "answer one letter at least 90% of the time" in up["letter_scoring"]["text"]
    skewed = _fake_summary(0.8, 0.3, 0.95)
    skewed["evaluate"]["dense-web"]["letter"]["acc"] = 0.6  # one letter 90% of the time, and the key favours it
    assert not {n["topic"]: n for n in build_notes(skewed, 2.0, 0.5)}["letter_scoring"]["shows"]
    down = {n["topic"]: n for n in build_notes(_fake_summary(0.3, 0.8, 0.28), 2.0, 0.5)}
    assert not down["textbook_vs_web"]["shows"] and "did not beat" in down["textbook_vs_web"]["text"]
    assert not down["moe_vs_dense"]["shows"] and "dense ahead" in down["moe_vs_dense"]["text"]
    assert "did not clearly differ" in down["moe_vs_dense"]["text"]
    assert not down["cloze_vs_chance"]["shows"] and "not met" in down["cloze_vs_chance"]["text"]
    below = _fake_summary(0.8, 0.3, 0.95)
    below["evaluate"]["arctic-textbook"]["letter"]["acc"] = 0.05  # far below chance is not "learned letters"
    assert not {n["topic"]: n for n in build_notes(below, 2.0, 0.5)}["letter_scoring"]["shows"]
    above = _fake_summary(0.8, 0.3, 0.95)
    above["evaluate"]["dense-web"]["letter"]["acc"] = 0.6
    above["evaluate"]["dense-web"]["predicted_letters"] = {"A": 30, "B": 25, "C": 25, "D": 20}
    text = {n["topic"]: n for n in build_notes(above, 2.0, 0.5)}["letter_scoring"]
    assert text["shows"] and "clearly above chance (25.0%) for dense-web" in text["text"]
    close = {n["topic"]: n for n in build_notes(_fake_summary(0.62, 0.6, 0.63), 2.0, 0.5)}
    assert not close["textbook_vs_web"]["shows"] and "within noise" in close["textbook_vs_web"]["text"]


# ----- the quality target: three seeds of the full demo ------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(3600)  # three full demos, about 5 minutes each
def test_full_demo_textbook_cloze_target_over_three_seeds(tmp_path):
    torch.set_num_threads(1)
    accs, chat = [], {"base": [], "sft": [], "dpo": []}
    for seed in (0, 1, 2):
        cfg = DemoConfig(seed=seed)
        s = run_pipeline(cfg, tmp_path / f"seed{seed}")
        assert s["clean"]["planted_leak_check"]["exact"]
        accs.append(s["evaluate"]["dense-textbook"]["cloze"]["acc"])
        for m in chat:
            chat[m].append(s["posttrain"]["evaluate"][m]["chat_exact_match"]["acc"])
        assert s["timings"]["total"]["wall_s"] < 600
    print("cloze", accs, "chat exact match", chat)
    assert sum(accs) / len(accs) >= DemoConfig().cloze_target, accs
    # the post-training issue's target: the chat-form quiz, post-trained >= 60%, base < 10%
    assert sum(chat["dpo"]) / 3 >= 0.6 and sum(chat["base"]) / 3 < 0.1, chat


def test_reference_config_files_match_the_builtin_settings(tmp_path):
    root = CONFIGS
    assert DemoConfig.from_toml(root / "demo.toml") == DemoConfig()
    assert DemoConfig.from_toml(root / "demo-quick.toml") == DemoConfig.quick()
    assert DemoConfig.from_toml(root / "demo.toml", {"seed": 4}).seed == 4
    bad = tmp_path / "bad.toml"
    bad.write_text("[demo]\nnum_fact = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*num_fact.*did you mean 'num_facts'"):
        DemoConfig.from_toml(bad)
    bad.write_text("[demo]\nnum_facts = 'many'\n")
    with pytest.raises(ConfigError, match=r"demo\.num_facts='many'"):
        DemoConfig.from_toml(bad)
