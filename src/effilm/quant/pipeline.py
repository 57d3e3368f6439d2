"""The quantize pipeline, written once: model directory in, quantized checkpoint and report out.

``effilm quantize`` and the demo's ship stage both call :func:`quantize_dir`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from effilm.config.quant import QuantConfig
from effilm.errors import EffilmError


def text_windows(path, tokenizer, seq_len: int, what: str, limit: int | None = None) -> torch.Tensor:
    """The text of ``path`` (any input format; JSONL texts and text files whole, joined by blank
    lines) tokenized and cut into ``[N, seq_len]`` windows, at most ``limit`` of them."""
    from effilm.data.inputs import iter_inputs
    from effilm.quant.report import windows

    if tokenizer is None:
        raise EffilmError(f"{what} needs a tokenizer: pass --tokenizer DIR or put tokenizer.json in the model directory")
    text = "\n\n".join(d.text for d in iter_inputs(path, text_split="file"))
    try:
        ids = windows(tokenizer.encode(text), seq_len)
    except ValueError as exc:
        raise EffilmError(f"{what} {path}: {exc}") from None
    return ids if limit is None else ids[:limit]


def quantize_dir(src, out, cfg: QuantConfig, *, tokenizer_dir=None, calib_ids=None, eval_ids=None,
                 fp_model=None, compare_rtn: bool = True, measure_rss: bool = False, overwrite: bool = False,
                 sources=()) -> dict:
    """Quantize the model in directory ``src`` as ``cfg`` says and write the checkpoint to ``out``
    (atomically, with the tokenizer files of ``tokenizer_dir``, default ``src``), plus
    ``quant_report.json`` and ``quant_report.txt`` beside it.

    ``calib_ids`` (GPTQ's calibration windows) and ``eval_ids`` (held-out windows for perplexity
    and greedy agreement) are ``[N, T]`` token ids. A GPTQ run also reports round-to-nearest on the
    same settings when ``compare_rtn``. ``out`` is claimed first (:mod:`effilm.outputs`): never
    ``src`` or anything holding it, and an earlier quantized model is replaced only with
    ``overwrite``; ``sources`` names further inputs (calibration text) to protect. Returns
    ``{"model", "spec", "reports", "table"}``; the last report is ``cfg``'s."""
    from effilm.data.tokenizer import copy_tokenizer_files
    from effilm.formats.checkpoint import write_checkpoint_files
    from effilm.formats.load import load
    from effilm.io import atomic_dir, atomic_write_json, atomic_write_text
    from effilm.outputs import claim_dir
    from effilm.quant.quantize import quantize_model
    from effilm.quant.report import build_report, format_report

    src = Path(src)
    out = claim_dir(out, "quantize", sources=[src, tokenizer_dir, *sources], overwrite=overwrite)
    if cfg.method == "gptq" and calib_ids is None:
        raise EffilmError("method gptq needs calibration text (--calib FILE)")
    torch.manual_seed(0)
    fp = fp_model if fp_model is not None else load(src)
    q, spec = quantize_model(load(src), cfg, calib_ids)
    reports = []
    if cfg.method != "rtn" and compare_rtn:  # the baseline, on the same report
        rq, rspec = quantize_model(load(src), dataclasses.replace(cfg, method="rtn"))
        reports.append(build_report(fp, rq, rspec, eval_ids))
    with atomic_dir(out, mark="quantize") as tmp:
        write_checkpoint_files(tmp, q, extra={"quantization": spec})
        copy_tokenizer_files(tokenizer_dir or src, tmp)
    rss = measure_rss and (src / "config.json").is_file()
    reports.append(build_report(fp, q, spec, eval_ids, src if rss else None, out if rss else None))
    table = format_report(reports)
    atomic_write_json(out / "quant_report.json", {"reports": reports})
    atomic_write_text(out / "quant_report.txt", table + "\n")
    return {"model": q, "spec": spec, "reports": reports, "table": table}


def spec_line(spec: dict) -> str:
    return json.dumps({k: spec[k] for k in ("bits", "group_size", "asym", "method")})
