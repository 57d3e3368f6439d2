"""``effilm plan``: memory per weight format, fit, bandwidth-bound decode speed, and the measurement."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from effilm.config import ModelConfig
from effilm.config.cost import kv_cache_bytes_per_token, num_active_params, num_params
from effilm.config.plan import DEVICES, format_bits, parse_bandwidth, parse_size, plan
from effilm.errors import ConfigError


def test_sizes_and_rates_parse_and_bad_ones_name_the_flag():
    assert parse_size("8GiB", "--memory") == 8 * 1024**3 and parse_size("16GB", "--memory") == 16e9
    assert parse_size("512 MiB", "--memory") == 512 * 1024**2 and parse_size("1.5TB", "--memory") == 1.5e12
    assert parse_bandwidth("100GB/s") == 100e9 and parse_bandwidth("50GiB/s") == 50 * 1024**3
    for bad in ("eight", "8XB", "-1GB", "0GB"):
        with pytest.raises(ConfigError, match="--memory"):
            parse_size(bad, "--memory")
    with pytest.raises(ConfigError, match="--bandwidth='100GB': expected a rate"):
        parse_bandwidth("100GB")


def test_bytes_follow_the_formats_and_the_active_parameters():
    cfg = ModelConfig.from_name("phi-3-mini-4k")
    p = plan(cfg, DEVICES["phone-8gb"], context=4096)
    rows = {r["format"]: r for r in p["formats"]}
    assert rows["bf16"]["weight_bytes"] == 2 * num_params(cfg) and rows["fp32"]["weight_bytes"] == 4 * num_params(cfg)
    kv = kv_cache_bytes_per_token(cfg, 2) * 4096
    assert rows["bf16"]["kv_cache_bytes"] == kv == 1.5 * 1024**3  # 32 layers x 2 x 32 heads x 96 x 2 bytes x 4096
    assert rows["bf16"]["total_bytes"] == int((2 * num_params(cfg) + kv) * 1.1)
    assert format_bits("int4-g32", 3072) == 5.0 and format_bits("int4-g128", 3072) == 4.25
    # int4 shrinks the matmul weights only; embeddings and head stay 16-bit
    assert rows["int4-g32"]["weight_bytes"] > num_params(cfg) * 5 / 8
    assert [rows[f]["fits"] for f in ("fp32", "bf16", "int8", "int4-g32")] == [False, False, True, True]
    assert rows["int4-g32"]["tokens_per_s"] == pytest.approx(50e9 / rows["int4-g32"]["read_bytes_per_step"])
    # an MoE model reads its routed experts only: Arctic reads about 17B of its 480B parameters per token
    arctic = ModelConfig.from_name("arctic")
    a = {r["format"]: r for r in plan(arctic, DEVICES["laptop-16gb"], context=1024)["formats"]}
    read_params = (a["bf16"]["read_bytes_per_step"] - a["bf16"]["kv_cache_bytes"]) / 2
    assert abs(read_params - num_active_params(arctic)) / num_active_params(arctic) < 0.05
    assert a["bf16"]["weight_bytes"] / a["bf16"]["read_bytes_per_step"] > 20
    # batch: the weights are read once for all sequences, each sequence reads its own KV cache
    b4 = {r["format"]: r for r in plan(cfg, DEVICES["phone-8gb"], context=4096, batch=4)["formats"]}
    assert b4["bf16"]["kv_cache_bytes"] == 4 * kv
    assert b4["bf16"]["tokens_per_s_total"] > rows["bf16"]["tokens_per_s_total"]


def test_bad_plans_are_clear_errors():
    cfg = ModelConfig.from_name("tiny-dense")
    with pytest.raises(ConfigError, match="exceeds the model's context window"):
        plan(cfg, DEVICES["phone-8gb"], context=cfg.max_seq_len + 1)
    with pytest.raises(ConfigError, match="--context and --batch must be >= 1"):
        plan(cfg, DEVICES["phone-8gb"], context=16, batch=0)
    p = subprocess.run([sys.executable, "-m", "effilm", "plan", "tiny-dense"], capture_output=True, text=True)
    assert p.returncode == 2 and "give --device NAME, or both --memory" in p.stderr and "Traceback" not in p.stderr


def test_cli_prints_the_table_and_measures_on_this_machine():
    p = subprocess.run([sys.executable, "-m", "effilm", "plan", "tiny-dense", "--memory", "3MiB", "--bandwidth",
                        "30GB/s", "--context", "64", "--measure", "--json"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    fits = {f["format"]: f["fits"] for f in r["formats"]}
    assert fits["fp32"] is False and fits["int4-g32"] is True  # 3 MiB: only the 4-bit formats fit
    m = r["measured"]["effilm"]
    assert set(m) == {"fp32", "int8", "int4-g32"} and all(v > 0 for v in m.values())
    text = subprocess.run([sys.executable, "-m", "effilm", "plan", "phi-3-mini-4k", "--device", "phone-8gb"],
                          capture_output=True, text=True).stdout
    assert "int4-g32" in text and "fits" in text and "phone-8gb" in text
