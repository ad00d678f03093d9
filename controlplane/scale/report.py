"""The report of one run: ``result.json`` (every figure), ``summary.md`` (pass/fail per
invariant and goal, per fault) and, when matplotlib is installed (the ``scale`` extra),
``convergence.png``, ``restarts.png``, ``etcd_requests.png`` (etcd's request rate by method
over time) and ``memory.png`` (the workers' RSS and etcd's DB size over time)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def _baseline(c: Record | None) -> str:
    return "-" if not c else f"p50 {c['p50_s']} / p99 {c['p99_s']} / max {c['max_s']} s"


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _memory(m: Record) -> str:
    return (
        f"{_mib(m['rss_per_agent_bytes'])} RSS per agent (workers {_mib(m['workers_rss_bytes'])}), "
        f"+{m['growth_per_agent_per_endpoint_bytes']} B per agent per endpoint held "
        f"({m['endpoints']} endpoints)"
    )


def markdown(record: Record) -> str:
    s = record.get("summary", {})
    lines = [
        f"# Scale run: {record['scenario']}",
        "",
        f"- result: **{_mark(bool(s.get('passed')))}**, {record.get('duration_s')} s, "
        f"etcd {record.get('etcd_version', '?')}",
        f"- agents: {record.get('agents')} in {record.get('workers')} worker processes "
        f"(real `Agent`, userspace maps, own etcd connections each); "
        f"{record.get('operators')} `cp-operator` processes; "
        f"{record.get('etcd_clusters')} etcd cluster(s) x {record.get('etcd_members')} members",
        f"- boot: agents ready {record['phases'].get('agents_ready_s')} s, "
        f"populated {record['phases'].get('populated_s')} s; every ipcache caught up "
        f"{_baseline(record['phases'].get('baseline_convergence'))} after that",
        f"- daemon logs with a traceback: operators {record.get('operator_tracebacks') or 'none'}, "
        f"workers {record.get('worker_tracebacks') or 'none'}",
    ]
    phases = record["phases"]
    burst = phases.get("identity_allocations")
    if burst:
        lines.append(
            f"- identity allocations: {burst['per_s']}/s ({burst['ok']} fresh label sets at "
            f"once over every worker in {burst['seconds']} s, {burst['failed']} failed)"
        )
    memory = phases.get("memory")
    if memory:
        lines.append(f"- agent memory after populating: {_memory(memory)}")
    samples = record.get("timeline", {}).get("samples", [])
    if samples:
        peak = max(samples, key=lambda x: sum(x[1].values()))
        lines.append(
            f"- etcd: DB size (largest member) {_mib(samples[-1][2])} at the end, "
            f"peak {_mib(max(x[2] for x in samples))}; peak request rate "
            f"{round(sum(peak[1].values()))}/s at {peak[0]} s"
        )
    unprovoked = record.get("unprovoked_restarts", {})
    lines.append(
        f"- restarts outside every fault window: {unprovoked.get('count', 0)}"
        + (f" (first: {unprovoked['first'][:3]})" if unprovoked.get("count") else "")
    )
    if "error" in record:
        lines.append(f"- **harness error**: {record['error']}")
    lines += [
        "",
        "| # | fault | fault s | restarts/agent | reasons | ready-again spread s "
        "| shard recoveries | converge p50 / p99 / max s | churn ok/failed | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, f in enumerate(record["faults"], 1):
        checks = {**f["invariants"], **f["goals"]}
        failed = [k for k, v in checks.items() if not v["pass"]]
        dist = ", ".join(f"{k}: {n}" for k, n in sorted(f["restarts"]["distribution"].items()))
        rec = "; ".join(
            f"{shard} " + ", ".join(f"{k}: {n}" for k, n in sorted(d.items()))
            for shard, d in f["recoveries"].items()
        )
        c = f["convergence"]
        lines.append(
            f"| {i} | {f['kind']} | {f['fault_s']} | {dist} | "
            f"{', '.join(f'{k} {n}' for k, n in f['restarts']['reasons'].items()) or '-'} | "
            f"{_or_dash(f['restarts']['ready_again_spread_s'])} | "
            f"{rec or '-'} | {c['p50_s']} / {c['p99_s']} / {c['max_s']} "
            f"({c['converged']}/{c['total']}; idle +{c['churn_idle_after_heal_s']}, "
            f"then max {c['after_idle_max_s']}) | {f['churn']['ok']}/{f['churn']['failed']} | "
            f"{'PASS' if not failed else 'FAIL: ' + '; '.join(failed)} |"
        )
    lines += [
        "",
        "Convergence is timed per agent from the heal until its ipcache equals the store's "
        'endpoints; churn stops at the heal, and operations in flight finish "idle +N" s '
        'later (the store can change until then); "then max" is the worst lag after that.',
        "",
        "## Checks per fault",
        "",
    ]
    for i, f in enumerate(record["faults"], 1):
        lines.append(f"{i}. **{f['kind']}** ({json.dumps(f['notes'])})")
        if f.get("etcd_requests_per_s"):
            top = sorted(f["etcd_requests_per_s"].items(), key=lambda kv: -kv[1])[:6]
            lines.append("   - etcd requests/s: " + ", ".join(f"{k} {v}" for k, v in top))
        if f.get("memory"):
            lines.append(f"   - memory: {_memory(f['memory'])}")
        if f["churn"].get("errors"):
            errors = {k: n for k, n in f["churn"]["errors"].items() if n}
            lines.append(f"   - churn errors: {json.dumps(errors)}")
        for kind in ("invariants", "goals"):
            for name, v in f[kind].items():
                detail = f" ({v['count']}: {'; '.join(v['details'])})" if not v["pass"] else ""
                lines.append(f"   - {kind[:-1]}: {name}: {_mark(v['pass'])}{detail}")
    plots = record.get("plots")
    lines += ["", f"Plots: {plots}" if isinstance(plots, list) else f"Plots: none ({plots})", ""]
    return "\n".join(lines)


def plots(record: Record, out_dir: Path) -> list[str] | str:
    """Write the PNGs; the file names, or why there are none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[scale]')"
    written = []
    faults = record["faults"]
    if faults:
        fig, ax = plt.subplots(figsize=(max(6, len(faults) * 1.4), 4))
        data = [list(f["convergence"]["per_agent_s"].values()) or [0.0] for f in faults]
        ax.boxplot(data, whis=(0, 100))
        ax.set_xticks(range(1, len(faults) + 1), [f["kind"] for f in faults], rotation=20)
        ax.set_ylabel("ipcache converged after heal (s)")
        ax.set_title(f"{record['scenario']}: convergence per fault, every agent")
        fig.tight_layout()
        fig.savefig(out_dir / "convergence.png", dpi=100)
        plt.close(fig)
        written.append("convergence.png")
    timeline = record.get("timeline", {})
    fig, ax = plt.subplots(figsize=(10, 4))
    _spans(ax, timeline.get("faults", []))
    points = timeline.get("restarts", [])
    reasons = sorted({p[2] for p in points})
    for reason in reasons:
        xs = [p[1] for p in points if p[2] == reason]
        ys = [p[0] for p in points if p[2] == reason]
        ax.scatter(xs, ys, s=8, label=f"restart: {reason}")
    back = [p for p in points if p[3] is not None]
    if back:
        ax.scatter(
            [p[3] for p in back],
            [p[0] for p in back],
            s=10,
            marker="x",
            c="0.4",
            label="ready again",
        )
    if reasons:
        ax.legend(fontsize=7)
    ax.set_ylim(-0.5, max(1, int(record.get("agents") or 1)) - 0.5)
    ax.set_xlabel("time since start (s); red: fault, green: hold")
    ax.set_ylabel("agent")
    ax.set_title(f"{record['scenario']}: control-plane restarts")
    fig.tight_layout()
    fig.savefig(out_dir / "restarts.png", dpi=100)
    plt.close(fig)
    written.append("restarts.png")
    samples = timeline.get("samples", [])
    if samples:
        written += _over_time(plt, record, samples, timeline.get("faults", []), out_dir)
    return written


def _spans(ax: Any, faults: list[Any]) -> None:
    for kind, start, heal, end in faults:
        ax.axvspan(start, heal, color="tab:red", alpha=0.15)
        ax.axvspan(heal, end, color="tab:green", alpha=0.08)
        ax.text(start, 0, kind, rotation=90, fontsize=7, va="bottom")


def _over_time(
    plt: Any, record: Record, samples: list[Any], faults: list[Any], out_dir: Path
) -> list[str]:
    """etcd's request rate by method, and memory (workers' RSS, etcd's DB), over time."""
    ts = [x[0] for x in samples]
    methods = sorted({m for x in samples for m in x[1]})
    totals = {m: sum(x[1].get(m, 0.0) for x in samples) for m in methods}
    top = sorted(methods, key=lambda m: -totals[m])[:6]
    lines = [(m, [x[1].get(m, 0.0) for x in samples], 1.0) for m in top]
    lines.append(("all", [sum(x[1].values()) for x in samples], 1.5))
    _timeseries(
        plt,
        ts,
        lines,
        faults,
        "etcd requests/s (all members)",
        f"{record['scenario']}: etcd request rate",
        out_dir / "etcd_requests.png",
    )
    memory = [
        ("worker processes' RSS", [x[3] / 2**20 for x in samples], 1.0),
        ("etcd DB size (largest member)", [x[2] / 2**20 for x in samples], 1.0),
    ]
    _timeseries(
        plt, ts, memory, faults, "MiB", f"{record['scenario']}: memory", out_dir / "memory.png"
    )
    return ["etcd_requests.png", "memory.png"]


def _timeseries(
    plt: Any,
    ts: list[float],
    lines: list[tuple[str, list[float], float]],
    faults: list[Any],
    ylabel: str,
    title: str,
    path: Path,
) -> None:
    fig, ax = plt.subplots(figsize=(10, 4))
    _spans(ax, faults)
    for label, ys, width in lines:
        ax.plot(ts, ys, label=label, linewidth=width)
    ax.legend(fontsize=7)
    ax.set_xlabel("time since start (s); red: fault, green: hold")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(record: Record, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    record["plots"] = plots(record, out_dir)
    (out_dir / "result.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    (out_dir / "summary.md").write_text(markdown(record))
