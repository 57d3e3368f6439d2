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

from effilm.demo.config import MODEL_NAMES, MOE_RUNS, DemoConfig
from effilm.demo.notes import build_notes, fact_statements
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
    assert {n["topic"] for n in s["notes"]} >= {"cloze_vs_chance", "textbook_vs_web", "filtered_web", "moe_vs_dense",
                                                  "letter_scoring", "decontamination", "twins", "scale"}
    assert "== what this shows ==" in stdout
    assert set(s["costs"]) == {"arctic", "phi-3-mini-4k", "openelm-270m"}


def test_quick_data_stats_match_the_files(quick):
    out, _, s = quick
    syn = s["synthesize"]
    for name, st in syn["corpora"].items():
        recs = _jsonl(st["path"])
        assert len(recs) == st["documents"] and sum(len(r["text"]) for r in recs) == st["chars"], name
    quiz = _jsonl(syn["quiz"]["path"])
    # the public quiz asks part of the taught facts, the private twins the rest
    assert len(quiz) == syn["quiz"]["items"] and len(quiz) + syn["twins"]["items"] == syn["facts"]["count"]
    assert Path(syn["twins"]["dir"], "public.jsonl").read_text() == Path(syn["quiz"]["path"]).read_text()
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


def test_quick_twins_stage(quick):
    """The deliberately contaminated model really read the public quiz items, is labelled so, and every
    compared model has both accuracies, a gap inside its interval and its n-gram figure."""
    out, _, s = quick
    tw = s["twins"]
    assert set(tw["models"]) == {"dense-web", "dense-textbook", "dense-contaminated"}
    assert [m for m, v in tw["models"].items() if v["label"] != "clean"] == ["dense-contaminated"]
    leak = Path(tw["leak"]["path"]).read_text(encoding="utf-8")
    quiz = _jsonl(s["synthesize"]["quiz"]["path"])
    assert all(q["question"] in leak for q in quiz) and tw["leak"]["ngram_found"] == len(quiz)
    run = json.loads(Path(tw["contaminated_run"]["config"]).read_text())
    assert run["model"]["init_from"] == s["train"]["dense-web"]["final_dir"]
    assert set(run["data"]["stages"][0]["mixture"]) == {"web", "quiz_leak"} and tw["contaminated_run"]["tokens"] > 0
    twins = _jsonl(Path(tw["dir"]) / "twins.jsonl")
    for name, m in tw["models"].items():
        g = m["gaps"]["acc"]
        assert g["n_public"] == len(quiz) and g["n_twins"] == len(twins), name
        assert g["ci"][0] <= g["gap"] <= g["ci"][1] and m["flagged"] == (g["ci"][0] > 0 or g["ci"][1] < 0), name
        rep = json.loads(Path(m["report"]).read_text())
        assert [t["name"] for t in rep["tasks"]] == ["public", "twins"] and rep["gaps"]["acc"] == g
    assert tw["models"]["dense-contaminated"]["ngram_contaminated"] == len(quiz)
    assert tw["models"]["dense-textbook"]["ngram_contaminated"] == 0
    assert (out / "plots" / "twins.png").is_file() and "Private twins" in (out / "report.md").read_text()


def test_quick_models_equal_budgets_and_active_params(quick):
    _, _, s = quick
    tr = s["train"]
    assert len({t["tokens_total"] for t in tr.values()}) == 1
    dense, arctic = tr["dense-textbook"], tr["arctic-textbook"]
    for name in MOE_RUNS:
        assert abs(tr[name]["active_params"] - dense["active_params"]) / dense["active_params"] < 0.02, name
        assert tr[name]["total_params"] > 3 * dense["total_params"] and tr[name]["balance"] == MOE_RUNS[name]
        assert all(x >= 1.0 for x in tr[name]["final_balance"]["load_max_over_mean"])
    up = tr["arctic-upcycled"]
    assert up["upcycled_from"]["run"] == "dense-textbook" and up["tokens"] + up["upcycled_from"]["tokens"] == dense["tokens"]
    assert Path(up["upcycled_from"]["checkpoint"]).name == f"step-{up['upcycled_from']['step']:08d}"
    assert [st["name"] for st in up["stages"]] == ["textbook"]
    assert [st["name"] for st in tr["dense-web"]["stages"]] == ["web"]
    assert [st["name"] for st in dense["stages"]] == ["web", "textbook"] == [st["name"] for st in arctic["stages"]]
    assert s["evaluate"]["arctic-upcycled"]["trained_on"] == ["textbook", "web"]  # its dense steps read web text
    for name, t in tr.items():
        records = [r for r in _jsonl(Path(t["run_dir"]) / "metrics.jsonl") if r["kind"] == "train"]
        assert records[-1]["tokens"] == t["tokens"] and records[-1]["step"] == t["steps"], name
        assert math.isfinite(t["final_loss"]) and t["final_loss"] < t["first_loss"], name
        assert (Path(t["final_dir"]) / "tokenizer.json").is_file()


def test_quick_quality_filter_keeps_the_top_share(quick):
    out, stdout, s = quick
    cfg = DemoConfig.quick()
    qf, syn = s["clean"]["quality_filter"], s["synthesize"]
    # the classifier learned from a slice generated apart from the corpus it filters
    ann = _jsonl(syn["paths"]["annotate_web"])
    assert len(ann) == cfg.annotate_records == qf["annotations"]["scored"] and qf["annotations"]["unscored"] == 0
    assert not {r["id"] for r in ann} & {r["id"] for r in _jsonl(s["clean"]["paths"]["web"])}
    clf = json.loads((Path(qf["classifier"]["path"]) / "classifier.json").read_text())
    assert clf["features"]["kind"] == "ngram" and Path(qf["classifier"]["png"]).is_file()
    assert 0.5 < qf["classifier"]["f1"] <= 1 and qf["classifier"]["split"]["test"] > 0
    # the top share by score, from the cleaned web corpus, each record with its score
    web = _jsonl(s["clean"]["paths"]["web"])
    kept = _jsonl(s["clean"]["paths"]["web_filtered"])
    assert qf["input_documents"] == len(web) and qf["rejected_by_filter"] == 0
    assert len(kept) == qf["kept_documents"] == round(cfg.filter_keep_fraction * len(web))
    assert {r["id"] for r in kept} <= {r["id"] for r in web}
    assert min(r["quality"] for r in kept) == qf["score_cutoff"] >= max(e["score"] for e in qf["examples"]["low"])
    assert qf["kept"]["documents"] + qf["dropped"]["documents"] == len(web)
    # why: the kept documents state more facts among fewer distractor lines, as the rubric rewards
    assert qf["kept"]["facts_per_document"] > qf["dropped"]["facts_per_document"]
    assert qf["kept"]["noise_lines_per_document"] < qf["dropped"]["noise_lines_per_document"]
    assert qf["kept"]["mean_rubric_score"] > qf["dropped"]["mean_rubric_score"]
    assert len(qf["examples"]["high"]) == len(qf["examples"]["low"]) == cfg.filter_examples
    assert min(e["score"] for e in qf["examples"]["high"]) >= max(e["score"] for e in qf["examples"]["low"])
    # the same tokenizer, the same budget, dense-textbook's stage split with filtered web in place of textbook
    d = s["tokenize"]["datasets"]["web_filtered"]
    assert d["documents"] == len(kept) and d["tokens"] < s["tokenize"]["datasets"]["web"]["tokens"]
    tr, ev = s["train"], s["evaluate"]
    assert [st["name"] for st in tr["dense-filtered"]["stages"]] == ["web", "web_filtered"]
    assert [st["tokens"] for st in tr["dense-filtered"]["stages"]] == [st["tokens"] for st in tr["dense-textbook"]["stages"]]
    assert ev["dense-filtered"]["trained_on"] == ["web", "web_filtered"] and ev["dense-filtered"]["contamination"]["contaminated"] == 0
    assert "quality filter: classifier F1" in stdout
    # the note's "why": the filtered model reads each fact more often than the web-only one, at equal tokens
    seen = fact_statements(s)
    assert seen["dense-filtered"] > seen["dense-web"] > 0
    note = {n["topic"]: n for n in s["notes"]}["filtered_web"]
    assert f"each fact is stated about {seen['dense-filtered']} times" in note["text"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "What filtering buys" in md and "dense, web then filtered web" in md
    assert qf["examples"]["high"][0]["text"].split("\n")[0].replace("|", "\\|") in md


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
    dicts = {m: cfg.run_dict(m, str(tmp_path / m), "tok", {"web": "w", "textbook": "t", "web_filtered": "f"})
             for m in MODEL_NAMES}
    up = dicts.pop("arctic-upcycled")  # its architecture comes from dense-textbook's checkpoint (not built here)
    runs = {m: RunConfig.from_dict(d) for m, d in dicts.items()}
    budgets = {m: sum(s.tokens for s in r.data.stages) for m, r in runs.items()}
    budgets["arctic-upcycled"] = sum(st["tokens"] for st in up["data"]["stages"]) + cfg.upcycle_step * cfg.tokens_per_step
    assert len(set(budgets.values())) == 1 and budgets["dense-web"] >= cfg.train_tokens
    assert up["model"]["init_from"] == str(tmp_path / "dense-textbook" / "checkpoints" / f"step-{cfg.upcycle_step:08d}")
    assert runs["dense-textbook"].train.save_every == cfg.upcycle_step
    assert up["model"]["upcycle"] == {"experts": cfg.num_experts, "top_k": cfg.ffn_mult - 1, "pattern": "H",
                                      "granularity": cfg.ffn_mult, "residual": "slice", "seed": cfg.seed}
    web = runs["dense-textbook"].data.stages[0].tokens / budgets["dense-textbook"]
    assert abs(web - cfg.web_stage_fraction) < 0.01
    assert [(s.tokens, list(s.mixture)) for s in runs["dense-filtered"].data.stages] == [
        (runs["dense-textbook"].data.stages[0].tokens, ["web"]), (runs["dense-textbook"].data.stages[1].tokens, ["web_filtered"])]
    d, a = runs["dense-textbook"].model, runs["arctic-textbook"].model
    assert abs(a.num_active_params() - d.num_active_params()) / d.num_active_params() < 0.02
    assert a.num_params() > 3 * d.num_params() and a.layer_pattern == "H" and d.layer_pattern == "D"


def _fake_summary(tb: float, web: float, ar: float, se: float = 0.04, filtered: float | None = None) -> dict:
    def ev(acc):
        return {"cloze": {"acc": acc, "stderr": se}, "letter": {"acc": 0.25, "stderr": se},
                "bits_per_byte": {"heldout_textbook": 2.0 - acc, "heldout_web": 3.0 - acc}, "predicted_letters": {"A": 90, "B": 10}}

    def tr(total):
        return {"tokens": 1000, "active_params": 100, "total_params": total, "cpu_s": 10.0}

    leak = {"planted": [1, 2], "found_items": ["a", "b"], "missed": [], "false_positives": [], "exact": True,
            "confirm_threshold": 0.5, "window_words": 0, "without_distinguishing_words": {"false_positives": ["c"]}}
    s = {"evaluate": {"dense-web": ev(web), "dense-textbook": ev(tb), "arctic-textbook": ev(ar)},
         "train": {"dense-web": tr(100), "dense-textbook": tr(100), "arctic-textbook": tr(400)},
         "synthesize": {"quiz": {"chance": 0.25, "items": 100}, "facts": {"count": 100}},
         "clean": {"planted_leak_check": leak,
                   "corpora": {"web": {"decontam": {"after_cleaning": {"contaminated": 0}}}}}}
    if filtered is not None:
        s["evaluate"]["dense-filtered"], s["train"]["dense-filtered"] = ev(filtered), tr(100)
        group = {"facts_per_document": 3.5, "noise_lines_per_document": 2.0}
        s["clean"]["quality_filter"] = {
            "annotations": {"scored": 1000}, "keep_fraction": 0.3, "kept_documents": 1200, "input_documents": 4000,
            "score_cutoff": 3.4, "kept": group, "dropped": {"facts_per_document": 1.6, "noise_lines_per_document": 4.7},
            "classifier": {"f1": 0.9, "threshold": 3.0, "split": {"test": 200}}}
    return s


def test_twin_note_either_way():
    from effilm.demo.notes import _twin_note

    def model(label, public, twin, lo, hi):
        return {"label": label, "flagged": lo > 0 or hi < 0, "ngram_contaminated": 40 if label != "clean" else 0,
                "gaps": {"acc": {"public_acc": public, "twin_acc": twin, "gap": public - twin, "ci": [lo, hi]}}}

    def notes(tb_ci):
        tw = {"bootstrap": {"confidence": 0.95}, "leak": {"share": 0.1}, "contaminated_run": {"tokens": 1000},
              "models": {"dense-web": model("clean", 0.4, 0.38, -0.1, 0.14),
                         "dense-textbook": model("clean", 0.9, 0.85, *tb_ci),
                         "dense-contaminated": model("deliberately contaminated", 0.95, 0.4, 0.4, 0.7)}}
        out = []
        _twin_note(lambda topic, shows, text: out.append({"topic": topic, "shows": shows, "text": text}), tw)
        return out[0]

    good = notes((-0.05, 0.15))
    assert good["shows"] and "tells the contaminated model from the clean ones" in good["text"]
    assert "+55.0 points (95% CI [+40.0, +70.0]): flagged" in good["text"] and "dense-web, also clean" in good["text"]
    bad = notes((0.01, 0.1))
    assert not bad["shows"] and "does NOT separate" in bad["text"]


def test_notes_report_either_way():
    up = {n["topic"]: n for n in build_notes(_fake_summary(0.8, 0.3, 0.95), 2.0, 0.5)}
    assert up["textbook_vs_web"]["shows"] and " beat the web-only" in up["textbook_vs_web"]["text"]
    assert up["moe_vs_dense"]["shows"] and "MoE ahead" in up["moe_vs_dense"]["text"]
    assert "The best, Switch loss, is ahead of dense" in up["moe_vs_dense"]["text"]
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
    three = _fake_summary(0.3, 0.8, 0.28)  # the best of several hybrids is the one compared
    three["evaluate"]["arctic-loss-free"] = {**three["evaluate"]["arctic-textbook"], "bits_per_byte": {"heldout_textbook": 1.5}}
    three["train"]["arctic-loss-free"] = three["train"]["arctic-textbook"]
    note = {n["topic"]: n for n in build_notes(three, 2.0, 0.5)}["moe_vs_dense"]
    assert note["shows"] and "Switch loss 1.7200; loss-free balancing 1.5000" in note["text"]
    assert "The best, loss-free balancing, is ahead of dense by 0.2000" in note["text"]
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
    assert "filtered_web" not in close  # a summary without the filtered run gets no filtering note


def test_filtered_web_note_either_way():
    up = {n["topic"]: n for n in build_notes(_fake_summary(0.8, 0.3, 0.5, filtered=0.55), 2.0, 0.5)}["filtered_web"]
    assert up["shows"] and "filtered web beat the web-only model" in up["text"] and "a real difference" in up["text"]
    assert "cloze 55.0% vs 30.0% (difference +25.0 points" in up["text"]
    assert "lands 50% of the way from web-only to web-then-textbook" in up["text"]
    assert "kept the top 30.0% of the web corpus (1200 of 4000 documents" in up["text"]
    assert "3.5 facts and 2.0 distractor lines per document, against 1.6 and 4.7" in up["text"]
    assert "textbook text 1.700, 1.450, 1.200" in up["text"]  # web-only, filtered, textbook
    noise = {n["topic"]: n for n in build_notes(_fake_summary(0.8, 0.3, 0.5, filtered=0.33), 2.0, 0.5)}["filtered_web"]
    assert not noise["shows"] and "within noise" in noise["text"] and "6% of the way" in noise["text"]
    down = {n["topic"]: n for n in build_notes(_fake_summary(0.8, 0.5, 0.5, filtered=0.3), 2.0, 0.5)}["filtered_web"]
    assert not down["shows"] and "did not beat" in down["text"] and "on the far side of web-only" in down["text"]
    assert "question-and-answer form, which the textbook's exercises teach" in down["text"]
    assert "Density buys some recall" in up["text"] and "add little" not in up["text"]
    past = {n["topic"]: n for n in build_notes(_fake_summary(0.4, 0.3, 0.5, filtered=0.9), 2.0, 0.5)}["filtered_web"]
    assert past["shows"] and "past web-then-textbook" in past["text"]


# ----- the quality target: three seeds of the full demo ------------------------------------
@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory):
    """The full demo at seeds 0, 1 and 2 (run once for both slow tests)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("three_seeds")
    return [run_pipeline(DemoConfig(seed=seed), out / f"seed{seed}") for seed in (0, 1, 2)]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # three full demos, about 6 minutes each
def test_full_demo_textbook_cloze_target_over_three_seeds(three_seeds):
    accs, chat = [], {"base": [], "sft": [], "dpo": []}
    for s in three_seeds:
        assert s["clean"]["planted_leak_check"]["exact"]
        accs.append(s["evaluate"]["dense-textbook"]["cloze"]["acc"])
        for m in chat:
            chat[m].append(s["posttrain"]["evaluate"][m]["chat_exact_match"]["acc"])
        assert s["timings"]["total"]["wall_s"] < 600
    print("cloze", accs, "chat exact match", chat)
    assert sum(accs) / len(accs) >= DemoConfig().cloze_target, accs
    # the post-training issue's target: the chat-form quiz, post-trained >= 60%, base < 10%
    assert sum(chat["dpo"]) / 3 >= 0.6 and sum(chat["base"]) / 3 < 0.1, chat


def seed_table(summaries: list[dict]) -> dict:
    """Per model of the filtering comparison: cloze and bits per byte per seed, their mean and the
    seeds' standard error; and the paired (same seed) cloze difference filtered - web-only."""
    def stats(xs):
        m = sum(xs) / len(xs)
        return {"seeds": xs, "mean": m, "se": math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))}

    table = {}
    for name in ("dense-web", "dense-filtered", "dense-textbook"):
        ev = [s["evaluate"][name] for s in summaries]
        table[name] = {"cloze": stats([e["cloze"]["acc"] for e in ev]),
                       "bpb_textbook": stats([e["bits_per_byte"]["heldout_textbook"] for e in ev]),
                       "bpb_web": stats([e["bits_per_byte"]["heldout_web"] for e in ev])}
    table["filtered_minus_web"] = stats([f - w for f, w in zip(table["dense-filtered"]["cloze"]["seeds"],
                                                                table["dense-web"]["cloze"]["seeds"], strict=True)])
    return table


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_full_demo_filtered_web_over_three_seeds(three_seeds):
    """Issue 18's target: over three seeds, web then filtered web beats web only on quiz cloze by
    more than the seeds' standard error (of the paired, same-seed difference). Measured at keep
    0.6: +3.8, +7.5, +5.0 points at seeds 0, 1, 2 (mean +5.4, standard error 1.1); keep 0.3 did not
    meet it (docs/ARCHITECTURE.md, "The learned quality filter", has both tables)."""
    t = seed_table(three_seeds)
    print(json.dumps(t, indent=1))
    diff = t["filtered_minus_web"]
    assert diff["mean"] > diff["se"], t
    # the textbook model stays far ahead: filtered web text still never asks in the quiz's form
    assert t["dense-textbook"]["cloze"]["mean"] - t["dense-filtered"]["cloze"]["mean"] > 0.3, t
    for s in three_seeds:
        qf = s["clean"]["quality_filter"]
        assert qf["classifier"]["f1"] > 0.9 and qf["kept"]["facts_per_document"] > 2 * qf["dropped"]["facts_per_document"]
        assert qf["kept"]["noise_lines_per_document"] < qf["dropped"]["noise_lines_per_document"]
        seen = fact_statements(s)
        assert seen["dense-filtered"] > 1.1 * seen["dense-web"], seen


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
