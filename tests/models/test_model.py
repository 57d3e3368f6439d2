import pytest
import torch

from effilm.config import ModelConfig
from effilm.models.transformer import build_model


def _cfg(name, **over):
    return ModelConfig.from_name(name, vocab_size=257, max_seq_len=128, **over)


CASES = {
    "dense": _cfg("tiny-dense"),
    "moe": _cfg("tiny-moe"),
    "hybrid": _cfg("tiny-arctic"),
    "sliding": _cfg("tiny-dense", sliding_window=7),
    "openelm": _cfg("tiny-openelm"),
    "longrope": _cfg(
        "tiny-dense", rope_type="longrope", rope_original_max_seq_len=16, rope_short_factor=[1.1] * 16,
        rope_long_factor=[4.0] * 16,
    ),
}


@pytest.mark.parametrize("name", [k for k in CASES if k != "longrope"])
def test_incremental_decoding_matches_full_forward(name):
    cfg = CASES[name]
    model = build_model(cfg, seed=1).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 32)
        steps = [model(ids[:, :10], cache=cache).logits]  # prefill, then one token at a time
        for t in range(10, 24):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-4)


def test_longrope_switches_factors_past_original_context():
    cfg = CASES["longrope"]
    model = build_model(cfg, seed=1).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        short = model(ids[:, :16]).logits
        long = model(ids).logits[:, :16]
    assert (short - long).abs().max() > 1e-3  # past 16 tokens every position uses the long factors


def test_hybrid_block_moe_reads_block_input():
    cfg = CASES["hybrid"]
    model = build_model(cfg, seed=2).eval()
    block = model.layers[0]
    x = torch.randn(1, 5, cfg.d_model)
    cos, sin = model.rotary(torch.arange(5)[None], x.dtype)
    with torch.no_grad():
        out, _ = block(x, cos, sin, None, None, 0)
        a = x + block.attn(block.attn_norm(x), cos, sin, None, None, 0, 0)
        expected = a + block.mlp(block.mlp_norm(a)) + block.moe(block.moe_norm(x))[0]
    torch.testing.assert_close(out, expected)


def test_moe_outputs_losses_and_stats():
    cfg = CASES["hybrid"]
    model = build_model(cfg, seed=3)
    out = model(torch.randint(0, cfg.vocab_size, (2, 16)))
    assert out.logits.shape == (2, 16, cfg.vocab_size)
    assert len(out.routing) == cfg.n_layers and out.aux_loss.item() >= 1.0 - 1e-5
    assert out.moe_loss.requires_grad
    assert all(int(s.counts_E.sum()) == 32 * cfg.moe.top_k for s in out.routing)


def test_padding_mask_keeps_real_rows_exact():
    cfg = CASES["dense"]
    model = build_model(cfg, seed=4).eval()
    ids = torch.randint(3, cfg.vocab_size, (1, 9))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 9)], dim=1).bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(ids).logits
        got = model(padded, attention_mask=mask, positions=positions).logits[:, 3:]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_bad_input_ids_are_a_clear_error():
    model = build_model(CASES["dense"])
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randn(2, 3))


def test_init_is_seeded_and_norms_are_ones():
    a, b = build_model(CASES["moe"], seed=5), build_model(CASES["moe"], seed=5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight))
    assert a.lm_head.weight is a.embed.weight
