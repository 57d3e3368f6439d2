"""effilm plot: metrics parsing, the plotted series, the PNGs and the command line."""

import json
import struct

import pytest
import torch
from plot_fixtures import LOG_EVERY, SEQ_LEN, TOKENS_PER_STEP, make_run, skewed_load, train_rec

from effilm.cli import main
from effilm.config import ModelConfig
from effilm.errors import ConfigError, EffilmError
from effilm.reports.metrics import (
    active_flops_series,
    expert_loads,
    load_run,
    read_metrics,
    stage_starts,
    train_series,
    val_flops_series,
    val_series,
)
from effilm.reports.plots import PlotConfig, draw_expert_load, ema, plot_compare, plot_runs

SMALL = PlotConfig(dpi=40)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def size_is(path, w: float, h: float) -> bool:
    """The PNG is w x h pixels, give or take matplotlib's rounding of inches x dpi."""
    pw, ph = png_size(path)
    return abs(pw - w) <= 1 and abs(ph - h) <= 1


def write_lines(path, recs, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return path


# --- parsing ---------------------------------------------------------------------------------


def test_reads_dense_and_moe_runs(tmp_path):
    dense = load_run(make_run(tmp_path, "tiny-dense", steps=60))
    assert [r["step"] for r in dense.metrics.train] == list(range(LOG_EVERY, 61, LOG_EVERY))
    assert len(dense.metrics.val) == 2 and len(dense.metrics.events) == 4
    assert dense.label == "tiny-dense" and dense.model_config["name"] == "tiny-dense"
    moe = load_run(make_run(tmp_path, "tiny-arctic"))
    assert moe.metrics.train[0]["expert_load"] is not None


def test_truncated_last_line_is_dropped_with_a_warning(tmp_path):
    run = make_run(tmp_path, "tiny-dense", steps=60, truncated_tail=True)
    with pytest.warns(UserWarning, match=r"metrics.jsonl:\d+: ignoring a truncated last line"):
        m = read_metrics(run / "metrics.jsonl")
    assert m.train[-1]["step"] == 60 and len(m.warnings) == 1


def test_bad_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    good = train_rec(1, "web", 100)
    path = write_lines(tmp_path / "metrics.jsonl", [good], tail='{"kind": "train", "st\n' + json.dumps(good) + "\n")
    with pytest.raises(EffilmError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(path)


@pytest.mark.parametrize(
    "rec, match",
    [
        ({"kind": "train", "step": 1, "tokens": 10, "lr": 1e-3}, r":1: train record has no 'loss'"),
        ({"kind": "trian", "step": 1}, r":1: 'kind' is 'trian'"),
        ({"kind": "val", "step": 1, "tokens": 10, "val_loss": 2.0}, r"'val_loss' must map"),
        ({"kind": "train", "step": "1", "tokens": 10, "loss": 1.0, "lr": 1e-3}, r"'step' must be a number"),
        (dict(train_rec(1, "s", 1), expert_load=[[0.5, 0.5]], moe_layers=[0, 1]), r"'moe_layers' must list"),
        (dict(train_rec(1, "s", 1), expert_load=[[0.5, 0.5]], moe_layers=["0"]), r"'moe_layers' must list"),
        (dict(train_rec(1, "s", 1), expert_load=[[0.5, "x"]]), r"'expert_load' must be a list"),
    ],
)
def test_malformed_records_are_errors(tmp_path, rec, match):
    path = write_lines(tmp_path / "metrics.jsonl", [rec, train_rec(2, "s", 1)])
    with pytest.raises(EffilmError, match=match):
        read_metrics(path)


def test_missing_dir_missing_metrics_and_empty_metrics(tmp_path):
    with pytest.raises(EffilmError, match="no such run directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    with pytest.raises(EffilmError, match="no metrics.jsonl"):
        load_run(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").write_text("\n")
    with pytest.raises(EffilmError, match="no train or val records"):
        load_run(tmp_path / "run")
    write_lines(tmp_path / "run" / "metrics.jsonl", [{"kind": "event", "step": 0, "event": "stage_start"}])
    with pytest.raises(EffilmError, match="no train or val records"):
        load_run(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text("{oops")
    write_lines(tmp_path / "run" / "metrics.jsonl", [train_rec(1, "s", 1)])
    with pytest.raises(EffilmError, match=r"config.json:1: not valid JSON"):
        load_run(tmp_path / "run")


def test_resumed_run_supersedes_the_redone_steps(tmp_path):
    recs = [train_rec(s, "web", 1) for s in (5, 10, 15)]
    redo = [dict(train_rec(s, "web", 1), loss=100.0 + s) for s in (10, 15, 20)]
    path = write_lines(tmp_path / "metrics.jsonl", [*recs, {"kind": "event", "step": 10, "event": "resume"}, *redo])
    m = read_metrics(path)
    assert [r["step"] for r in m.train] == [5, 10, 15, 20]
    assert [r["loss"] for r in m.train][1:] == [110.0, 115.0, 120.0]
    assert m.superseded == 2


# --- the series that are drawn ---------------------------------------------------------------


def test_loss_lr_and_val_series(tmp_path):
    m = load_run(make_run(tmp_path, "tiny-dense", steps=60, val_sources=("web", "textbook"))).metrics
    loss = train_series(m, "loss")
    assert loss.steps == list(range(5, 61, 5)) and loss.tokens == [s * TOKENS_PER_STEP for s in loss.steps]
    assert loss.values == [train_rec(s, "x", 1)["loss"] for s in loss.steps]
    assert train_series(m, "lr").values[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    vals = val_series(m)
    assert list(vals) == ["web", "textbook"]
    assert vals["web"].steps == [30, 60] and vals["web"].values == pytest.approx([3.0, 2.9])
    assert vals["textbook"].values == pytest.approx([3.05, 2.95])
    assert stage_starts(m) == [("web", 5, 5 * TOKENS_PER_STEP), ("textbook", 30, 30 * TOKENS_PER_STEP)]


def test_nan_loss_is_left_out_of_the_curve(tmp_path):
    recs = [train_rec(1, "s", 1), dict(train_rec(2, "s", 1), loss=float("nan")), train_rec(3, "s", 1)]
    m = read_metrics(write_lines(tmp_path / "metrics.jsonl", recs))
    assert train_series(m, "loss").steps == [1, 3]


def test_expert_load_relative_to_uniform(tmp_path):
    cfg = ModelConfig.from_name("tiny-moe")
    run = load_run(make_run(tmp_path, "tiny-moe", steps=40, stages=("web",)))
    loads = expert_loads(run.metrics)
    E = cfg.moe.num_experts
    assert [ll.layer for ll in loads] == list(range(cfg.n_layers))
    for j, ll in enumerate(loads):
        assert ll.num_experts == E and ll.steps == list(range(5, 41, 5))
        hot = j % E
        for s, step in enumerate(ll.steps):
            expect = [x * E for x in skewed_load(E, step, hot)]
            assert [ll.relative[e][s] for e in range(E)] == pytest.approx(expect)
        assert ll.relative[hot][0] > 1 > ll.relative[(hot + 1) % E][0]
    assert expert_loads(load_run(make_run(tmp_path, "tiny-dense")).metrics) == []


def test_expert_load_uses_moe_layer_indices_and_normalises_counts(tmp_path):
    recs = [dict(train_rec(s, "s", 1), expert_load=[[30, 10], [20, 20]], moe_layers=[1, 3]) for s in (1, 2)]
    loads = expert_loads(read_metrics(write_lines(tmp_path / "metrics.jsonl", recs)))
    assert [ll.layer for ll in loads] == [1, 3]
    assert loads[0].relative == [[1.5, 1.5], [0.5, 0.5]] and loads[1].relative == [[1.0, 1.0], [1.0, 1.0]]
    recs.append(dict(train_rec(3, "s", 1), expert_load=[[1, 1, 1], [1, 1]], moe_layers=[1, 3]))
    with pytest.raises(EffilmError, match=r"metrics.jsonl:3: layer 1 has 3 experts here but 2 earlier"):
        expert_loads(read_metrics(write_lines(tmp_path / "metrics.jsonl", recs)))


def test_active_flops_from_records_and_from_config(tmp_path):
    run = load_run(make_run(tmp_path, "tiny-arctic"))
    per_token = 3 * ModelConfig.from_name("tiny-arctic").flops_per_token(SEQ_LEN)
    f = active_flops_series(run)
    assert f.tokens == [s * TOKENS_PER_STEP * per_token for s in f.steps]
    vf = val_flops_series(run)
    assert vf["web"].steps == [30, 60] and vf["web"].tokens == pytest.approx([s * TOKENS_PER_STEP * per_token for s in (30, 60)])
    assert vf["web"].values == val_series(run.metrics)["web"].values
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    stripped = [json.dumps({k: v for k, v in json.loads(x).items() if k != "active_flops"}) for x in lines]
    (run.path / "metrics.jsonl").write_text("\n".join(stripped) + "\n")
    assert active_flops_series(load_run(run.path)).tokens == f.tokens
    (run.path / "config.json").unlink()
    with pytest.raises(EffilmError, match="no 'active_flops'"):
        active_flops_series(load_run(run.path))


def test_ema_is_bias_corrected():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert ema([0.0, 10.0], 0.5) == pytest.approx([0.0, 10.0 * 0.5 / 0.75])
    with pytest.raises(ConfigError, match="plot.smoothing"):
        PlotConfig(smoothing=1.0)


# --- PNGs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """A dense and an MoE run plotted together once (drawing is the slow part)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("plots")
    runs = [make_run(root, "tiny-dense"), make_run(root, "tiny-arctic")]
    notes = []
    return root / "out", plot_runs(runs, root / "out", SMALL, notes), notes


def test_plot_runs_writes_each_run_and_the_comparison(plotted):
    out, paths, notes = plotted
    assert sorted(str(p.relative_to(out)) for p in paths) == [
        "compare_loss.png", "tiny-arctic/balance.png", "tiny-arctic/expert_load.png", "tiny-arctic/loss.png",
        "tiny-arctic/train_stats.png", "tiny-dense/loss.png", "tiny-dense/train_stats.png"]  # fmt: skip
    assert all(p.stat().st_size > 3000 for p in paths)
    assert not list(out.rglob(".*.tmp"))
    # a dense run has no heatmap, and says so
    assert notes == ["tiny-dense: no expert_load records (a dense run?), so no expert-load heatmap"]


def test_png_sizes_follow_the_layout(plotted):
    out, _, _ = plotted
    d, n_layers = SMALL.dpi, ModelConfig.from_name("tiny-arctic").n_layers
    assert size_is(out / "tiny-arctic" / "loss.png", SMALL.panel_width * 2 * d, SMALL.panel_height * 2 * d)
    assert size_is(out / "tiny-arctic" / "expert_load.png", SMALL.panel_width * d, SMALL.heatmap_height * n_layers * d)
    assert size_is(out / "tiny-arctic" / "balance.png", SMALL.panel_width * 2 * d, SMALL.panel_height * d)
    # grad norm and throughput for both; the MoE run adds aux loss and dropped fraction (2 x 2 panels)
    assert size_is(out / "tiny-dense" / "train_stats.png", SMALL.panel_width * 2 * d, SMALL.stats_height * d)
    assert size_is(out / "tiny-arctic" / "train_stats.png", SMALL.panel_width * 2 * d, SMALL.stats_height * 2 * d)


def test_many_moe_layers_wrap_into_columns(tmp_path):
    layers = [2 * i + 1 for i in range(5)]
    recs = [dict(train_rec(s, "web", 1), expert_load=[skewed_load(16, s, h) for h in range(5)], moe_layers=layers)
            for s in (5, 10, 15)]  # fmt: skip
    run = load_run(write_lines(tmp_path / "run" / "metrics.jsonl", recs).parent)
    cfg = PlotConfig(dpi=20, heatmap_max_rows=2)
    path = draw_expert_load(run, expert_loads(run.metrics), tmp_path / "h.png", cfg)
    assert size_is(path, 3 * cfg.panel_width * cfg.dpi, 2 * cfg.heatmap_height * cfg.dpi)  # 3 columns of 2, 1 empty


def test_plot_compare_labels(tmp_path):
    a, b = make_run(tmp_path, "tiny-dense"), make_run(tmp_path, "tiny-arctic")
    paths = plot_compare([a, b], tmp_path / "cmp", labels=["dense", "arctic"], cfg=SMALL)
    assert [p.name for p in paths] == ["compare_loss.png"] and png_size(paths[0])[0] > 100
    with pytest.raises(EffilmError, match="1 labels given for 2 runs"):
        plot_compare([a, b], tmp_path / "cmp", labels=["x"])


def test_several_runs_fail_before_writing_anything(tmp_path):
    a = make_run(tmp_path, "tiny-dense")
    with pytest.raises(EffilmError, match="no such run directory"):
        plot_runs([a, tmp_path / "missing"], tmp_path / "out", SMALL)
    assert not (tmp_path / "out").exists()


# --- command line ----------------------------------------------------------------------------


def test_cli_plot(tmp_path, capsys):
    run = make_run(tmp_path, "tiny-dense")
    assert main(["plot", str(run), "--dpi", "30"]) == 0
    out = capsys.readouterr().out
    assert "no expert-load heatmap" in out and (run / "plots" / "loss.png").is_file()
    assert main(["plot", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"effilm plot: error: {tmp_path / 'missing'}: no such run directory"
    with pytest.raises(SystemExit) as exc:
        main(["plot", "-h"])
    assert exc.value.code == 0 and "expert_load.png" in capsys.readouterr().out


def test_val_flops_interpolates_between_train_records(tmp_path):
    recs = [dict(train_rec(s, "s", 1), active_flops=float(f)) for s, f in ((10, 100.0), (20, 300.0))]
    recs += [{"kind": "val", "step": s, "tokens": t, "val_loss": {"v": 1.0}} for s, t in ((0, 0), (15, 15360), (40, 40960))]
    write_lines(tmp_path / "run" / "metrics.jsonl", recs)
    vf = val_flops_series(load_run(tmp_path / "run"))["v"]
    assert vf.steps == [0, 15, 40] and vf.tokens == pytest.approx([0.0, 200.0, 300.0 * 40960 / 20480])
