"""The demo's post-training stage: the textbook model becomes a chat model.

``posttrain(cfg, summary, out)``:

* checks the chat conversations and preference pairs ``synthesize`` wrote against the quiz (the
  decontamination scan the corpora went through; their phrasings are the exercises', never the quiz's);
* tokenizes them with the demo's tokenizer and its chat template (``--chat`` and ``--preferences``);
* fine-tunes ``cfg.posttrain_from`` with SFT (the loss over the assistant's tokens only), then the
  SFT model with DPO (the right answer against a plausible wrong one), each through
  ``effilm.train.loop.train`` from a run config written beside its run (``init_from``);
* evaluates the base, SFT and SFT+DPO models on the quiz asked as free-form chat questions
  (``chat:`` task: the chat template, greedy answers, normalised exact match) and by letter scoring;
* serves the SFT+DPO model with ``effilm serve`` and asks it two quiz questions through the
  official ``openai`` client, keeping the transcript (skipped, and said so, without the serve extras).

It returns the ``posttrain`` section of ``summary.json``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from effilm.demo.config import POSTTRAIN_LABELS as LABELS
from effilm.demo.config import DemoConfig
from effilm.errors import EffilmError
from effilm.io import atomic_write_json

TRANSCRIPT_QUESTIONS = 2


def posttrain(cfg: DemoConfig, summary: dict, out: Path, log=print) -> dict:
    from effilm.demo.stages import quiz_spec
    from effilm.eval.tasks import load_task

    synth, trained = summary["synthesize"], summary["train"]
    quiz_path = Path(synth["quiz"]["path"])
    quiz = load_task(quiz_spec(quiz_path))
    data = _data(cfg, synth, summary["tokenize"]["tokenizer"], quiz, out / "tokens")
    for kind, d in data.items():
        log(f"  {kind}: {d['records']} records, {d['tokens']:,} tokens; quiz items found in it: {d['contaminated']}")
    base = trained[cfg.posttrain_from]["final_dir"]
    runs = {"sft": _train(cfg, "sft", out / "runs", base, data["chat"]["path"], log)}
    runs["dpo"] = _train(cfg, "dpo", out / "runs", runs["sft"]["final_dir"], data["preferences"]["path"], log)
    dirs = {"base": base, "sft": runs["sft"]["final_dir"], "dpo": runs["dpo"]["final_dir"]}
    results = _evaluate(cfg, quiz_path, synth["quiz"]["chance"], dirs, out / "eval", log)
    transcript = serve_transcript(dirs["dpo"], quiz.items[:TRANSCRIPT_QUESTIONS], cfg.chat_max_new_tokens, log)
    section = {"from": cfg.posttrain_from, "data": data, "runs": runs, "evaluate": results, "transcript": transcript}
    atomic_write_json(out / "posttrain.json", section)
    return section


def _data(cfg: DemoConfig, synth: dict, tokenizer: str, quiz, out: Path) -> dict:
    from effilm.config.data import TokenizeConfig
    from effilm.data.shards import tokenize_files
    from effilm.demo.stages import decontam_config
    from effilm.eval.decontam_scan import find_contamination

    data = {}
    for kind in ("chat", "preferences"):  # TokenizeConfig's flags have the same names
        src = Path(synth["posttrain"][kind]["path"])
        found = find_contamination([quiz], [src], decontam_config(cfg))["benchmarks"][0]
        target = out / kind
        if target.exists():
            shutil.rmtree(target)
        m = tokenize_files([src], tokenizer, target, TokenizeConfig(**{kind: True}))
        data[kind] = {"path": str(target), "source": str(src), "records": synth["posttrain"][kind]["records"],
                      "tokens": m["tokens"], "contaminated": found["contaminated"],
                      "contaminated_ids": found["contaminated_ids"]}
    return data


def _train(cfg: DemoConfig, kind: str, out: Path, init_from: str, data: str, log) -> dict:
    from effilm.demo.train import fresh_run, timed_train

    d = cfg.posttrain_run_dict(kind, str(out / kind), init_from, data)
    run, _ = timed_train(fresh_run(d, out / f"{kind}.json", f"demo run {kind}"), cfg.seed)
    result = {**run, "config": str(out / f"{kind}.json"), "init_from": init_from}
    if kind == "dpo":
        result["dpo"] = d["dpo"]
        result["last"] = _last_rewards(Path(run["run_dir"]))
    log(f"  {kind}: {run['steps']} steps from {Path(init_from).parent.name}/{Path(init_from).name}, loss "
        f"{run['first_loss']:.3f} -> {run['final_loss']:.3f}, {run['wall_s']:.1f}s wall")
    return result


def _last_rewards(run_dir: Path) -> dict:
    from effilm.reports.metrics import read_metrics

    train = read_metrics(run_dir / "metrics.jsonl").train
    keys = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")
    return {k: train[-1].get(k) for k in keys} if train else {}


def _evaluate(cfg: DemoConfig, quiz_path: Path, chance: float, dirs: dict, out: Path, log) -> dict:
    """The quiz asked as chat questions (exact match) and by letter scoring, for every model."""
    import torch

    from effilm.demo.stages import quiz_spec
    from effilm.demo.train import accuracy
    from effilm.eval.report import run_evaluation
    from effilm.eval.scoring import EvalConfig
    from effilm.eval.tasks import load_task
    from effilm.formats.load import load_model_and_tokenizer

    torch.set_num_threads(cfg.threads)
    chat = load_task(f"chat:{quiz_path},name=quiz-chat")
    letter = load_task(quiz_spec(quiz_path))
    results = {}
    for name, path in dirs.items():
        model, tokenizer = load_model_and_tokenizer(path)
        entry: dict = {"model_dir": path, "chance": chance, "reports": {}}
        for metric, task, ecfg in (
            ("chat", chat, EvalConfig(shots=0, batch_size=cfg.eval_batch_size, seed=cfg.seed,
                                      max_new_tokens=cfg.chat_max_new_tokens)),
            ("letter", letter, EvalConfig(shots=0, scoring="letter", batch_size=cfg.eval_batch_size, seed=cfg.seed)),
        ):
            rep = run_evaluation(model, tokenizer, [task], ecfg, model_path=path)
            report_path = out / f"{name}-{metric}.json"
            atomic_write_json(report_path, rep)
            entry["reports"][metric] = str(report_path)
            q = rep["tasks"][0]
            if metric == "chat":
                entry["chat_exact_match"] = accuracy(q, "exact_match")
                entry["chat_examples"] = [{k: r[k] for k in ("question", "answers", "output", "correct")}
                                          for r in q["items"][:4]]
            else:
                entry["letter"] = accuracy(q, "acc")
                preds = [r["prediction"] for r in q["items"]]
                entry["predicted_letters"] = {"ABCD"[i]: preds.count(i) for i in range(len(letter.items[0].choices))}
        results[name] = entry
        log(f"  {LABELS[name]:22s} chat exact match {entry['chat_exact_match']['acc']:.3f}  "
            f"letter {entry['letter']['acc']:.3f} (chance {chance:.2f})")
    return results


def serve_transcript(model_dir: str, items, max_tokens: int, log=print) -> dict:
    """Start ``effilm serve`` on a free port, ask each item's question through the ``openai``
    client's chat completions (greedy), stop the server; returns the transcript."""
    from effilm.demo.extras import SERVE_MODULES, missing_modules

    missing = missing_modules(SERVE_MODULES)
    if missing:
        log(f"  serve transcript: not available (missing {', '.join(missing)})")
        return {"status": "not available", "missing": missing}
    import openai

    argv = [sys.executable, "-m", "effilm", "serve", model_dir, "--port", "0", "--log-level", "warning"]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            url = _wait_for_url(proc, err, timeout=120)
            client = openai.OpenAI(base_url=url, api_key="none", timeout=60, max_retries=0)
            model = client.models.list().data[0].id
            turns = []
            for it in items:
                messages = [{"role": "user", "content": it.question}]
                reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                       temperature=0)
                choice = reply.choices[0]
                turns.append({"messages": messages, "reply": choice.message.content,
                              "finish_reason": choice.finish_reason, "expected": it.choices[it.answer]})
                log(f"  serve: user: {it.question!r}\n         assistant: {choice.message.content!r} "
                    f"(expected {it.choices[it.answer]!r})")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {"status": "done", "url": url, "model": model, "client": f"openai {openai.__version__}",
            "request": {"max_tokens": max_tokens, "temperature": 0}, "turns": turns, "server_exit": proc.returncode}


def _wait_for_url(proc: subprocess.Popen, err, timeout: float) -> str:
    """The ``http://…/v1`` URL ``effilm serve`` prints once it listens (its stdout is drained
    by a thread from then on, so the server never blocks on a full pipe)."""
    found: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            m = re.search(r"on (http://\S+/v1)", line)
            if m and not found:
                found.append(m.group(1))
                ready.set()
        ready.set()  # the server exited

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or not found:
        proc.kill()
        proc.wait()
        err.seek(0)
        raise EffilmError(f"effilm serve did not start within {timeout:.0f}s: {err.read().strip()[-500:]}")
    return found[0]
