"""An independent re-statement of lm-evaluation-harness's MMLU method, run through transformers.

Written from the harness's task config (mmlu default template: description, ``doc_to_text``,
``doc_to_choice`` ["A".."D"], target delimiter " ", few-shot delimiter "\\n\\n", ``first_n``
sampler over the dev split) and from ``HFLM._encode_pair`` / ``_loglikelihood_tokens``: one
request per (question, choice), unbatched, full-vocabulary log-softmax, ``np.argmax``. It shares
no code with effilm's scorer, so agreement between the two is a real check.
"""

from __future__ import annotations

import numpy as np
import torch


def mmlu_doc_to_text(question, choices):
    return f"{question.strip()}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}\nAnswer:"


def cloze_doc_to_text(question, choices):
    return f"Question: {question.strip()}\nAnswer:"


def build_context(item, dev_items, shots, cloze=False):
    subj = item["subject"].replace("_", " ")
    if cloze:
        desc = f"The following are questions (with answers) about {subj}.\n\n"
        to_text, to_target = cloze_doc_to_text, lambda d: d["choices"][d["answer"]]
    else:
        desc = f"The following are multiple choice questions (with answers) about {subj}.\n\n"
        to_text, to_target = mmlu_doc_to_text, lambda d: "ABCD"[d["answer"]]
    labeled = [to_text(d["question"], d["choices"]) + " " + to_target(d) for d in dev_items[:shots]]
    fewshot = "\n\n".join(labeled) + "\n\n" if labeled else ""
    return desc + fewshot + to_text(item["question"], item["choices"])


def encode_pair(hf_tok, context, continuation):
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = hf_tok(context + continuation, add_special_tokens=False)["input_ids"]
    context_enc = hf_tok(context, add_special_tokens=False)["input_ids"]
    return context_enc, whole_enc[len(context_enc):]


@torch.no_grad()
def loglikelihood(hf_model, hf_tok, context, continuation, max_length):
    ctx, cont = encode_pair(hf_tok, context, continuation)
    inp = torch.tensor([(ctx + cont)[-(max_length + 1):][:-1]], dtype=torch.long)
    logits = torch.nn.functional.log_softmax(hf_model(inp).logits, dim=-1)[0]
    logits = logits[-len(cont):]
    return float(logits.gather(1, torch.tensor(cont)[:, None]).sum())


def evaluate(hf_model, hf_tok, items, dev, shots, cloze=False, max_length=2048):
    """Per item: choice log-likelihoods, acc (and acc_norm for cloze)."""
    out = []
    for item in items:
        ctx = build_context(item, dev.get(item["subject"], []), shots, cloze)
        choices = item["choices"] if cloze else ["A", "B", "C", "D"]
        lls = np.array([loglikelihood(hf_model, hf_tok, ctx, " " + c, max_length) for c in choices])
        rec = {"lls": lls.tolist(), "acc": float(np.argmax(lls) == item["answer"])}
        if cloze:
            lens = np.array([float(len(c)) for c in choices])
            rec["acc_norm"] = float(np.argmax(lls / lens) == item["answer"])
        out.append(rec)
    return out
