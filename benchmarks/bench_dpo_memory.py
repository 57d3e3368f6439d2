"""Peak memory of DPO's log-probabilities: every position's logits against the answers' only.

Usage: PYTHONPATH=src python benchmarks/bench_dpo_memory.py [--pairs 8] [--seq-len 512] [--answer 4]
       [--vocab 32064] [--repeats 3] [--out benchmarks/results/bench_dpo_memory.json]

Each arm runs in a fresh process: a tiny-dense model with the given vocabulary (Phi-3's by
default) computes the summed answer log-probabilities of ``2 * pairs`` rows and backpropagates,
either from the full ``[rows, T, V]`` logits (what DPO did before ``logits_at``) or from the
answers' positions only (``Transformer.forward(logits_at=...)``, what ``sequence_logps`` does).
The peak resident memory growth of each (``ru_maxrss``) is reported; the arms alternate, and the
median over ``--repeats`` is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

ARM = """
import resource, sys, torch
from effilm.config import ModelConfig
from effilm.models.transformer import build_model
torch.set_num_threads(1)
arm, rows, T, answer, vocab = sys.argv[1], *map(int, sys.argv[2:6])
cfg = ModelConfig.from_name("tiny-dense", vocab_size=vocab, max_seq_len=T + 1)
model = build_model(cfg, seed=0).train()
ids = torch.randint(0, vocab, (rows, T + 1), generator=torch.Generator().manual_seed(0))
keep = torch.zeros(rows, T, dtype=torch.bool)
keep[:, -answer:] = True
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if arm == "full":
    logits = model(ids[:, :-1]).logits.float()
    logp = logits.gather(-1, ids[:, 1:, None])[..., 0] - logits.logsumexp(-1)
    sums = (logp * keep).sum(1)
else:
    logits = model(ids[:, :-1], logits_at=keep).logits.float()
    logp = logits.gather(-1, ids[:, 1:][keep][:, None])[:, 0] - logits.logsumexp(-1)
    sums = torch.zeros(rows, T).masked_scatter(keep, logp).sum(1)
sums.sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, sums.sum().item())
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--answer", type=int, default=4, help="answer tokens per row")
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "bench_dpo_memory.json"))
    a = ap.parse_args(argv)
    runs: dict[str, list[float]] = {"full": [], "answers": []}
    sums = {}
    for _ in range(a.repeats):
        for arm in runs:
            out = subprocess.run([sys.executable, "-c", ARM, arm, str(2 * a.pairs), str(a.seq_len), str(a.answer),
                                  str(a.vocab)], capture_output=True, text=True, check=True).stdout.split()
            runs[arm].append(float(out[0]))
            sums[arm] = float(out[1])
    med = {arm: statistics.median(v) for arm, v in runs.items()}
    print(f"{2 * a.pairs} rows x {a.seq_len} tokens, {a.answer} answer tokens per row, vocabulary {a.vocab}")
    print(f"{'arm':10s} {'peak RSS growth MiB (median)':>30s}  runs")
    for arm, v in runs.items():
        print(f"{arm:10s} {med[arm]:30.0f}  {[round(x) for x in v]}")
    print(f"full / answers-only: {med['full'] / max(med['answers'], 1e-9):.1f}x; summed log-probs agree: "
          f"{abs(sums['full'] - sums['answers']) <= 1e-3 * abs(sums['full'])}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"config": vars(a), "peak_rss_growth_mib": runs, "median": med,
                                       "logp_sums": sums}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
