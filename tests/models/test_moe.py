import pytest
import torch

from effilm.config import MoEConfig
from effilm.models.moe import MoE, capacity_keep_mask, load_balancing_loss


def _moe(E, K, skew=False, **kw):
    torch.manual_seed(E * 10 + K)
    m = MoE(32, MoEConfig(num_experts=E, top_k=K, expert_ffn_dim=24, **kw))
    with torch.no_grad():
        m.router.weight.normal_(0, 1)
        if skew:  # with inputs shifted along U (see _x), the first half of the experts get no tokens
            m.router.weight[: E // 2] = -30 * U
        m.experts.w_gate_up.normal_(0, 0.2)
        m.experts.w_down.normal_(0, 0.2)
    return m


U = torch.nn.functional.normalize(torch.ones(32), dim=0)


def _x(*shape):
    return torch.randn(*shape, 32) + 5 * U


def _run(m, impl, x):
    m.impl = impl
    for p in m.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    y, stats = m(x)
    (y.square().sum() + stats.prob_sum_E.sum()).backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("E", [4, 8, 32])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("skew", [False, True])
def test_fast_paths_match_reference_forward_and_backward(E, K, skew):
    if K > E:
        pytest.skip("top_k > experts")
    m = _moe(E, K, skew)
    x = _x(3, 37)
    ref = _run(m, "reference", x)
    impls = ["sorted", "grouped_mm"] if hasattr(torch.nn.functional, "grouped_mm") else ["sorted"]
    for impl in impls:
        got = _run(m, impl, x)
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
        for n in ref[2]:
            torch.testing.assert_close(got[2][n], ref[2][n], atol=1e-5, rtol=1e-5, msg=f"{impl} grad {n}")
    if skew and K <= E - E // 2:
        _, stats = m(x)
        assert (stats.counts_E[: E // 2] == 0).all()  # experts that get no tokens


def test_capacity_dropping_counts_and_agrees():
    m = _moe(4, 2, skew=True, capacity_factor=1.0)
    m.train()
    x = _x(64)
    ref = _run(m, "reference", x)
    got = _run(m, "sorted", x)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    _, stats = m(x)
    capacity = 64 * 2 // 4
    kept_per_expert = stats.counts_E.clamp(max=capacity)
    assert int(stats.dropped) == int((stats.counts_E - kept_per_expert).sum()) > 0
    m.eval()  # dropless at inference
    assert int(m(x)[1].dropped) == 0


def test_capacity_mask_prefers_first_choices():
    # expert 0 is the first choice of tokens 0 and 1 and the second of token 2; expert 1 is the
    # first choice of token 2 and the second of tokens 0 and 1. With room for 2, first choices win,
    # then earlier tokens.
    ids = torch.tensor([[0, 1], [0, 1], [1, 0]])
    keep = capacity_keep_mask(ids, 2, capacity=2)
    assert keep.tolist() == [[True, True], [True, False], [True, False]]


def test_aux_loss_conventions_at_perfect_balance():
    E, K, T = 8, 2, 64
    counts = torch.full((E,), T * K / E)
    probs = torch.full((E,), T / E)
    assert load_balancing_loss(counts, probs, T, K, "switch").item() == pytest.approx(1.0)
    assert load_balancing_loss(counts, probs, T, K, "hf").item() == pytest.approx(K)


def test_hf_convention_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    m = _moe(8, 2, aux_loss_convention="hf")
    x = torch.randn(50, 32)
    logits = torch.nn.functional.linear(x, m.router.weight)
    _, stats = m(x)
    ours = load_balancing_loss(stats.counts_E, stats.prob_sum_E, stats.n_tokens, 2, "hf")
    theirs = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_router_runs_in_fp32_under_bf16():
    """The router's logits, probabilities and choices are exactly the fp32 ones computed from the
    same inputs and weights: under bf16 autocast (mixed-precision training), with bf16 activations,
    and in a model cast to bf16."""
    m = _moe(16, 2)
    torch.nn.init.normal_(m.router.weight)  # spread logits: a bf16 router would pick other experts
    x = torch.randn(2000, 32)
    for inp in (x, x.to(torch.bfloat16)):  # fp32 and bf16 activations
        ref_logits, _, ref_w, ref_ids = m.route(inp.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, probs, w, ids = m.route(inp)
        assert logits.dtype == probs.dtype == w.dtype == torch.float32
        assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(w, ref_w)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what a bf16 matmul gives: other experts
        bf16_ids = torch.nn.functional.linear(x, m.router.weight).float().softmax(-1).topk(2).indices
    assert not torch.equal(bf16_ids, m.route(x)[3])
    m16 = _moe(16, 2)
    m16.load_state_dict(m.state_dict())
    m16 = m16.to(torch.bfloat16)
    ref32 = _moe(16, 2)
    ref32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})  # the same bf16-rounded weights
    x16 = x.to(torch.bfloat16)
    logits, _, _, ids = m16.route(x16)
    want_logits, _, _, want_ids = ref32.route(x16.float())
    assert logits.dtype == torch.float32 and torch.equal(logits, want_logits) and torch.equal(ids, want_ids)


# ----- the fast kernels (effilm.models.moe_kernels) --------------------------------------------------
IMPLS = ["sorted", "grouped_mm"] if hasattr(torch.nn.functional, "grouped_mm") else ["sorted"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _assert_all_close(got, ref, what):
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5, msg=f"{what}: output")
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5, msg=f"{what}: input grad")
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], atol=1e-5, rtol=1e-5, msg=f"{what}: grad {n}")


@pytest.mark.parametrize("E", [16, 64, 128])  # with the test above: every E of the benchmark sweep
def test_fast_paths_match_reference_at_benchmark_expert_counts(E, one_thread):
    m = _moe(E, 2)
    x = _x(96)
    ref = _run(m, "reference", x)
    assert ref[2]["router.weight"].abs().sum() > 0  # the router gradient is compared, not vacuous
    for impl in IMPLS:
        _assert_all_close(_run(m, impl, x), ref, f"{impl} E={E}")


@pytest.mark.parametrize("K", [1, 2])
def test_capacity_dropping_gradients_agree(K, one_thread):
    m = _moe(8, K, skew=True, capacity_factor=0.8)
    m.train()
    x = _x(80)
    _, stats = m(x)
    assert int(stats.dropped) > 0
    ref = _run(m, "reference", x)
    for impl in IMPLS:
        _assert_all_close(_run(m, impl, x), ref, f"{impl} K={K} with drops")


def test_loop_kernel_gradcheck_with_empty_experts_and_dropped_rows():
    from effilm.models.moe import grouped_expert_ffn

    torch.manual_seed(0)
    D, F_, E = 6, 4, 5
    counts = torch.tensor([3, 0, 2, 0, 1])  # experts 1 and 3 get no rows; 2 trailing rows are dropped
    x = torch.randn(8, D, dtype=torch.float64, requires_grad=True)
    w_gu = torch.randn(E, 2 * F_, D, dtype=torch.float64, requires_grad=True)
    w_d = torch.randn(E, D, F_, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: grouped_expert_ffn(a, counts, b, c), (x, w_gu, w_d))
    y = grouped_expert_ffn(x, counts, w_gu, w_d)
    assert (y[6:] == 0).all()
    y.sum().backward()
    assert (x.grad[6:] == 0).all() and (w_gu.grad[[1, 3]] == 0).all() and (w_d.grad[[1, 3]] == 0).all()
    # the rows of expert 2 are its own SwiGLU, computed directly
    g, u = (x[3:5] @ w_gu[2].t()).chunk(2, dim=-1)
    torch.testing.assert_close(y[3:5], (torch.nn.functional.silu(g) * u) @ w_d[2].t())


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="needs grouped_mm")
def test_grouped_mm_path_reads_nothing_back_to_the_host(monkeypatch, one_thread):
    m = _moe(8, 2, skew=True, capacity_factor=0.8, impl="grouped_mm")
    m.train()
    x = _x(40).requires_grad_(True)

    def forbidden(*a, **k):
        raise AssertionError("host sync on the grouped_mm path")

    for name in ("tolist", "item", "nonzero", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for name in ("nonzero", "bincount", "unique"):
        monkeypatch.setattr(torch, name, forbidden)
    y, stats = m(x)
    (y.square().sum() + stats.prob_sum_E.sum()).backward()
    monkeypatch.undo()
    assert x.grad is not None and int(stats.dropped) > 0


def test_fast_path_is_deterministic(one_thread):
    m = _moe(32, 2)
    x = _x(64)
    a, b = _run(m, "sorted", x), _run(m, "sorted", x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a[2][n], b[2][n]) for n in a[2])
