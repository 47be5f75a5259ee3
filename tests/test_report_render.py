"""The pictures and the HTML page are drawn from the plan's own numbers, and render offline."""

from __future__ import annotations

import re

import pytest

matplotlib = pytest.importorskip("matplotlib")

from cli import report_render as rr  # noqa: E402
from cli.plan_report import plan_sections, timeline_events, write_plan_report  # noqa: E402
from planner.cost.estimate import estimate  # noqa: E402
from planner.parallel import ParallelConfig  # noqa: E402
from planner.plan import build_plan  # noqa: E402
from planner.specs import Dtype, TrainingSpec  # noqa: E402
from presets import load_cluster, load_model  # noqa: E402


@pytest.fixture(scope="module")
def pp_plan():
    model = load_model("tiny-gpt")
    cluster = load_cluster("cpu-2", None)
    training = TrainingSpec(global_batch=8, seq_len=128, dtype=Dtype.FP32)
    config = ParallelConfig(tp=1, pp=2, dp=1, micro_batch=2, stage_layers=(1, 3))
    est = estimate(model, training, cluster, config).to_json()
    plan = build_plan(
        model=model,
        training=training,
        cluster=cluster,
        config=config,
        prediction=est,
        source="analytic",
    )
    return plan, est


def test_memory_bars_equal_the_estimate(pp_plan, tmp_path) -> None:
    _, est = pp_plan
    stages = [{"name": f"stage {s['pp_rank']}", **s["memory"]} for s in est["stages"]]
    fig = rr.memory_figure(stages, capacity_bytes=est["memory_capacity_bytes"], title="t")
    ax = fig.axes[0]
    for kind in rr.MEMORY_KINDS:
        bars = [p for p in ax.patches if p.get_gid() == f"mem-{kind}"]
        want = [s["memory"][kind] / rr.MIB for s in est["stages"]]
        assert [b.get_height() for b in bars] == pytest.approx(want)
    # stacked: each bar's top equals the stage's total predicted memory
    tops = {}
    for p in ax.patches:
        x = round(p.get_x(), 6)
        tops[x] = max(tops.get(x, 0.0), p.get_y() + p.get_height())
    assert sorted(tops.values()) == pytest.approx(
        sorted(s["memory_bytes"] / rr.MIB for s in est["stages"])
    )
    cap = [ln for ln in ax.get_lines() if ln.get_label() == "capacity"]
    assert cap and cap[0].get_ydata()[0] == pytest.approx(est["memory_capacity_bytes"] / rr.MIB)
    assert ax.get_xlabel() and "MiB" in ax.get_ylabel() and ax.get_title()
    paths = rr.save_figure(fig, tmp_path / "memory")
    assert all(p.stat().st_size > 0 for p in paths)
    assert 'id="mem-activations' in (tmp_path / "memory.svg").read_text()


def test_timeline_matches_the_estimate(pp_plan) -> None:
    plan, est = pp_plan
    events, end, caption = timeline_events(
        plan.model, plan.training, plan.cluster, plan.config, None, est
    )
    assert end == pytest.approx(est["step_time_s"], rel=1e-9)
    fwd = [e for e in events if e["kind"] == "forward"]
    bwd = [e for e in events if e["kind"] == "backward"]
    m = plan.num_micro_batches
    assert len(fwd) == len(bwd) == 2 * m
    # per rank, ops never overlap
    for r in range(2):
        spans = sorted((e["start_s"], e["end_s"]) for e in fwd + bwd if e["rank"] == r)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:], strict=False))
    # rank 1 (3 blocks + head) does more per micro-batch than rank 0 (1 block + embedding)
    t0 = sum(e["end_s"] - e["start_s"] for e in fwd if e["rank"] == 0)
    t1 = sum(e["end_s"] - e["start_s"] for e in fwd if e["rank"] == 1)
    assert t1 > t0
    # the bubble the figure draws is the idle time of each rank
    idle = rr.bubbles(events, 2, end)
    merged: list[list[float]] = []
    for a, b in sorted((e["start_s"], e["end_s"]) for e in events if e["rank"] == 0):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    busy0 = sum(b - a for a, b in merged)
    idle0 = sum(b["end_s"] - b["start_s"] for b in idle if b["rank"] == 0)
    assert idle0 > 0  # rank 0 waits for rank 1's backward in 1F1B
    assert busy0 + idle0 == pytest.approx(end, rel=1e-9)
    assert "analytic" in caption


def test_timeline_is_the_simulators_trace(pp_plan, monkeypatch) -> None:
    """The report simulates nothing itself: its bars are the cost model's schedule trace
    (planner/cost/schedule.py), whose end is the estimate's pipeline makespan."""
    from planner.cost import schedule

    plan, est = pp_plan
    calls = []
    real = schedule.simulate

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(schedule, "simulate", spy)
    events, end, _ = timeline_events(
        plan.model, plan.training, plan.cluster, plan.config, None, est
    )
    (sim,) = calls
    assert sim.trace
    bd = est["breakdown"]
    assert max(o.end_s for o in sim.trace) == sim.makespan_s
    assert end == pytest.approx(sim.makespan_s + bd["dp_comm_s"] + bd["optimizer_s"], rel=1e-15)
    assert end == pytest.approx(est["step_time_s"], rel=1e-12)
    compute = {(e["rank"], e["start_s"]): e for e in events if e["kind"] in ("forward", "backward")}
    ops = [o for o in sim.trace if o.kind is not schedule.OpKind.P2P]
    assert len(compute) == len(ops)
    for o in ops:
        bar = compute[(o.rank, o.start_s)]
        assert bar["kind"] == o.kind.value and bar["label"] == str(o.micro_batch)
        assert o.start_s < bar["end_s"] <= o.end_s
    waits = {(o.rank, o.start_s, o.end_s) for o in sim.trace if o.kind is schedule.OpKind.P2P}
    assert waits  # cpu-2's loopback link takes time
    drawn = {(e["rank"], e["start_s"], e["end_s"]) for e in events if e["kind"] == "communication"}
    assert waits <= drawn


def test_timeline_figure_labels(pp_plan) -> None:
    plan, est = pp_plan
    events, end, _ = timeline_events(
        plan.model, plan.training, plan.cluster, plan.config, None, est
    )
    fig = rr.timeline_figure(events, ranks=2, makespan_s=end, title="timeline")
    ax = fig.axes[0]
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"forward", "backward", "bubble"} <= labels
    assert re.search(r"\((ms|s)\)$", ax.get_xlabel()) and ax.get_ylabel()
    scale = 1e3 if ax.get_xlabel().endswith("(ms)") else 1.0
    # the drawn forward bars are exactly the replayed forward ops
    drawn = sorted(
        (round(x, 9), round(w, 9))
        for c in ax.collections
        if c.get_facecolor()[0].tolist()
        == list(matplotlib.colors.to_rgba(rr.TIMELINE_COLOURS["forward"]))
        for path in c.get_paths()
        for x, w in [
            (path.vertices[:, 0].min(), path.vertices[:, 0].max() - path.vertices[:, 0].min())
        ]
    )
    want = sorted(
        (round(e["start_s"] * scale, 9), round((e["end_s"] - e["start_s"]) * scale, 9))
        for e in events
        if e["kind"] == "forward"
    )
    assert len(drawn) == len(want)
    assert [v for pair in drawn for v in pair] == pytest.approx([v for pair in want for v in pair])
    rr._pyplot().close(fig)


def test_scatter_points_are_the_records(tmp_path) -> None:
    pts = [
        {"label": "a", "predicted_s": 0.1, "measured_s": 0.12, "top": True},
        {"label": "b", "predicted_s": 0.2, "measured_s": 0.18, "top": False},
    ]
    fig = rr.scatter_figure(pts, title="s")
    ax = fig.axes[0]
    offsets = ax.collections[-2].get_offsets()  # all configurations (the last is the top star)
    assert [float(v) for o in offsets for v in o] == pytest.approx([120.0, 100.0, 180.0, 200.0])
    line = [ln for ln in ax.get_lines() if ln.get_label().startswith("y = x")][0]
    xs, ys = line.get_data()
    assert list(xs) == list(ys)
    assert "ms" in ax.get_xlabel() and "ms" in ax.get_ylabel()
    rr.save_figure(fig, tmp_path / "scatter")
    assert (tmp_path / "scatter.png").stat().st_size > 0


def test_plan_report_html_is_offline(pp_plan, tmp_path) -> None:
    plan, est = pp_plan
    paths = write_plan_report(plan, est, tmp_path)
    assert sorted(p.name for p in paths) == [
        "memory.png",
        "memory.svg",
        "timeline.png",
        "timeline.svg",
    ]
    page = rr.html_page("report", plan_sections(plan, est, tmp_path, None))
    assert not re.search(r"https?://", page)
    assert "<link" not in page and "<script" not in page
    assert page.count("<svg") == 2
    assert f"{est['step_time_s'] * 1e3:.2f}" in page


def test_scatter_turns_logarithmic_for_wide_ranges() -> None:
    pts = [
        {"label": "fast", "predicted_s": 0.05, "measured_s": 0.3},
        {"label": "slow", "predicted_s": 0.2, "measured_s": 3.0},
    ]
    ax = rr.scatter_figure(pts, title="s").axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log" and "log" in ax.get_xlabel()
    narrow = rr.scatter_figure(
        [
            {"label": "a", "predicted_s": 0.25, "measured_s": 0.3},
            {"label": "b", "predicted_s": 0.1, "measured_s": 0.2},
        ],
        title="s",
    )
    assert narrow.axes[0].get_xscale() == "linear"
    rr._pyplot().close("all")


def test_save_figure_into_an_unwritable_place_is_one_spec_error(tmp_path) -> None:
    from planner.errors import SpecError

    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    fig = rr.scatter_figure([{"label": "a", "predicted_s": 0.1, "measured_s": 0.1}], title="s")
    with pytest.raises(SpecError, match=r"^--report .*afile"):
        rr.save_figure(fig, afile / "scatter", "--report")
    assert afile.read_text() == "keep me\n"
    assert not rr._pyplot().get_fignums()  # closed even when the write failed


def test_save_figure_leaves_no_temporary_files(tmp_path) -> None:
    fig = rr.scatter_figure([{"label": "a", "predicted_s": 0.1, "measured_s": 0.1}], title="s")
    rr.save_figure(fig, tmp_path / "scatter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scatter.png", "scatter.svg"]
    assert (tmp_path / "scatter.svg").read_text().lstrip().startswith("<?xml")
