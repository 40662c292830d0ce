"""From ``results.json`` to ``BENCHMARKS.md`` and its PNG plots (matplotlib, Agg backend).

``write_report(results, out)`` writes ``out/BENCHMARKS.md`` and ``out/bench/*.png``; it reads nothing
but the results dict, so a report can be regenerated from a saved JSON (whose targets are re-evaluated)::

    python -m bench.report docs/bench/results.json docs
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SECTIONS", "evaluate_targets", "write_report"]

SECTIONS = ["conditions", "limit", "appliance", "appliance_embedded", "naive", "latency", "overload", "idle",
            "hot_swap", "memory_per_model", "source_churn", "cheap", "designs"]
TARGET_STREAMS = 8  # the cheap model's target and the headline latency row


def _get(d: Any, *path: Any) -> Any:
    for p in path:
        if isinstance(d, dict):
            d = d.get(p)
        elif isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d):
            d = d[p]
        else:
            return None
    return d


def _rows(r: dict[str, Any], *path: str) -> list[dict[str, Any]]:
    v = _get(r, *path)
    return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []


def _row(rows: list[dict[str, Any]], streams: int) -> dict[str, Any] | None:
    if not rows:
        return None
    exact = [x for x in rows if x.get("streams") == streams]
    return exact[0] if exact else max(rows, key=lambda x: x.get("streams", 0))


def _f(v: Any, digits: int = 1, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def _foreign(x: dict[str, Any]) -> str:
    v = x.get("foreign_percent")
    if isinstance(v, list):
        return "/".join(f"{p:.0f}" for p in v)
    return _f(v, 0)


LIMIT_GOAL = 0.90  # x limit(k) at every stream count
NAIVE_GOAL = 1.0  # x naive at every stream count
CHEAP_GOAL = 0.80  # x limit(8) on the cheap model


def _throughput_targets(r: dict[str, Any], key: str, add: Any, limit_goal: float, naive_goal: float,
                        label: str) -> None:
    """At every stream count: the appliance over the limit at that concurrency, and over the naive baseline."""
    rows = [x for x in _rows(r, key) if x.get("x_limit") is not None]
    if not rows:
        return
    worst = min(rows, key=lambda x: x["x_limit"])
    each = ", ".join(f"{x['streams']}: {x['x_limit']:.2f}" for x in rows)
    add(f"Throughput vs limit(k) at every stream count{label}", f">= {limit_goal:.2f} x limit(k), k = "
        f"{rows[0]['streams']}..{rows[-1]['streams']}", f"worst {worst['x_limit']:.2f} at {worst['streams']} streams",
        worst["x_limit"], worst["x_limit"] >= limit_goal, f"by streams: {each}")
    naive = [x for x in rows if x.get("x_naive") is not None]
    if naive:
        worst = min(naive, key=lambda x: x["x_naive"])
        each = ", ".join(f"{x['streams']}: {x['x_naive']:.2f}" for x in naive)
        add(f"Throughput vs naive at every stream count{label}", f">= {naive_goal:.1f} x naive",
            f"worst {worst['x_naive']:.2f} at {worst['streams']} streams", worst["x_naive"],
            worst["x_naive"] >= naive_goal, f"by streams: {each}")


def _cpu_per_frame(row: dict[str, Any], limit: dict[str, Any] | None, cores: int | None) -> str:
    """CPU (ms of one core) per frame of each process; the worker's beyond the raw work, which takes all the
    cores for 1/limit(k) s per frame where the limit keeps every core busy."""
    fps = row.get("fps")
    if not fps:
        return "–"
    per = {role: pct * 10 / fps for role, pct in row.get("cpu_percent", {}).items()}
    parts = []
    for role, v in per.items():
        if role.startswith("worker") and limit and limit.get("fps") and cores:
            raw = cores * 1000 / limit["fps"]
            parts.append(f"{role} {v:.2f} ms ({v - raw:+.2f} beyond the raw work's {raw:.2f})")
        else:
            parts.append(f"{role} {v:.2f} ms")
    return ", ".join(parts)


def evaluate_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue with its measured value, the ratio that decides it and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(name: str, goal: str, measured: str, ratio: float | None, ok: bool | None, note: str = "") -> None:
        out.append({"target": name, "goal": goal, "measured": measured,
                    "ratio": None if ratio is None else round(ratio, 3), "met": ok, "note": note})

    _throughput_targets(r, "appliance", add, LIMIT_GOAL, NAIVE_GOAL, "")
    cheap = _rows(r, "cheap", "appliance")
    c8 = _row(cheap, TARGET_STREAMS)
    if c8 and c8.get("x_limit") is not None:
        cpu = _cpu_per_frame(c8, _row(_rows(r, "cheap", "limit"), c8["streams"]), r.get("cores"))
        add(f"Cheap model ({_get(r, 'cheap', 'model', 'name')}): throughput vs limit({c8['streams']})",
            f">= {CHEAP_GOAL:.2f} x limit({c8['streams']})",
            f"{c8['fps']:.1f} fps; limit {_f(_get(_row(_rows(r, 'cheap', 'limit'), c8['streams']), 'fps'))} fps "
            f"in the same rounds", c8["x_limit"], c8["x_limit"] >= CHEAP_GOAL,
            f"{_f(c8.get('x_naive'), 2)} x naive; CPU per frame beyond the work: {cpu} (section 10)")
    by_n = [x for x in _rows(r, "latency", "appliance") if x["beyond_inference_ms"]["p50"] is not None]
    if by_n:
        # the median over stream counts: one run disturbed by another user of the machine cannot decide it
        rnd = _row(_rows(r, "latency", "random_phases", "appliance"), TARGET_STREAMS)
        pooled = _get(r, "latency", "pooled", "appliance")
        for q, limit in (("p50", 5.0), ("p99", 20.0)):
            v = statistics.median(x["beyond_inference_ms"][q] for x in by_n)
            worst = max(by_n, key=lambda x: x["beyond_inference_ms"][q])
            notes = [(f"worst: {worst['beyond_inference_ms'][q]:.1f} ms at {worst['streams']} streams, "
                     f"others' CPU {_foreign(worst)} %")]
            if isinstance(pooled, dict) and pooled["beyond_inference_ms"][q] is not None:
                notes.append(f"all samples pooled: {pooled['beyond_inference_ms'][q]:.1f} ms")
            raw = [x["beyond_raw_work_ms"][q] for x in by_n if (x.get("beyond_raw_work_ms") or {}).get(q) is not None]
            if raw:
                notes.append(f"end to end minus the raw layout's per-frame p50 instead of each frame's own work: "
                             f"{statistics.median(raw):.1f} ms")
            if rnd and rnd["beyond_inference_ms"][q] is not None:
                notes.append(f"{rnd['streams']} streams with random camera phases, which adds queueing: "
                             f"{rnd['beyond_inference_ms'][q]:.1f} ms")
            add(f"Latency beyond inference {q} at 70 % load (median over {len(by_n)} stream counts)",
                f"< {limit:g} ms", f"{v:.1f} ms", v / limit, v < limit, "; ".join(notes))
    ov = r.get("overload") if isinstance(r.get("overload"), dict) and "fps" in r["overload"] else None
    if ov:
        fair = ov.get("fairness")
        add(f"Fairness at {ov['offered_fps'] / ov['capacity_fps']:.1f} x capacity (max/min stream fps)", "<= 1.2",
            _f(fair, 3), fair, fair is not None and fair <= 1.2)
        for role, m in ov["memory"].items():
            if role == "mosquitto":
                continue
            drift = m["drift_mb"]
            bound = max(2.0, 0.02 * m["start_mb"])
            add(f"Flat memory under overload: {role}", f"|drift| <= {bound:.1f} MB (2 % or 2 MB)",
                f"{drift:+.2f} MB over {ov['seconds']:.0f} s ({m['slope_mb_per_min']:+.3f} MB/min)",
                abs(drift) / bound, abs(drift) <= bound)
        age, closed = _get(ov, "frame_age_ms", "p99"), ov.get("closed_loop_p99_ms")
        if age is not None and closed:
            add("Fresh frames under overload: frame age p99", "<= 2 x closed-loop p99 at the same streams",
                f"{age:.0f} ms vs {closed:.0f} ms", age / closed, age <= 2 * closed,
                "the issue gives no number; this bound is ours")
    for broker in ("embedded", "mosquitto"):
        idle = _get(r, "idle", broker)
        if isinstance(idle, dict) and "rss_mb" in idle:
            with_broker = "includes mosquitto" if broker == "mosquitto" else ""
            add(f"Idle resident memory ({broker} broker)", "< 200 MB",
                f"{idle['rss_mb']:.0f} MB RSS summed ({idle['pss_mb']:.0f} MB PSS)", idle["rss_mb"] / 200,
                idle["rss_mb"] < 200, with_broker)
            add(f"Idle CPU ({broker} broker)", "< 1 % of one core", f"{idle['cpu_percent']:.2f} %",
                idle["cpu_percent"] / 1.0, idle["cpu_percent"] < 1.0, with_broker)
    churn = r.get("source_churn") if isinstance(r.get("source_churn"), dict) and "steps" in r["source_churn"] else None
    if churn:
        at = {s["step"]: s["rss_mb"] for s in churn["steps"]}
        add(f"Flat memory as cameras come and go: daemon RSS after a second wave of {churn['cameras']} new cameras "
            "vs after the first", "<= 1.10 x", f"{at['wave b']:.0f} vs {at['wave a']:.0f} MB",
            churn["second_x_first"], churn["second_x_first"] <= 1.1)
        add("Memory given back once they went silent: daemon RSS after vs before the cameras", "<= 1.10 x",
            f"{at['silence after wave b']:.0f} vs {at['before']:.0f} MB", churn["end_x_before"],
            churn["end_x_before"] <= 1.1, "the issue gives no number; this bound is ours")
    swap = r.get("hot_swap") if isinstance(r.get("hot_swap"), dict) and "lost" in r["hot_swap"] else None
    if swap:
        failed = swap["daemon"]["rejected"]
        lost = swap["lost_during_swap"]
        base = _row(_rows(r, "latency", "appliance"), swap["streams"])
        ref = f"; the same load with no swap: {base['unanswered']} of {base['sent']} lost" if base else ""
        add("Hot swap under load: frames lost or failed", "0",
            f"{lost} lost in the {swap['swap_window_s']:.1f} s swap window, {failed} failed "
            f"({swap['lost_outside_swap']} lost outside it{ref})", None, lost == 0 and failed == 0)
    return out


# --- plots ---------------------------------------------------------------------------------------


SERIES = (("appliance", "appliance (Mosquitto)", "o-", "C0"),
          ("appliance_embedded", "appliance (embedded broker)", "s--", "C1"),
          ("naive", "naive paho callback", "^-", "C2"))


def _plots(r: dict[str, Any], bench_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}
    limits = _rows(r, "limit_rounds")
    if _rows(r, "appliance"):
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for key, label, style, colour in SERIES:
            rows = _rows(r, key)
            if rows:
                ax.plot([x["streams"] for x in rows], [x["fps"] for x in rows], style, color=colour, label=label)
                ax2.plot([x["streams"] for x in rows], [x.get("x_limit") for x in rows], style, color=colour,
                         label=label)
        if limits:
            ax.plot([x["streams"] for x in limits], [x["fps"] for x in limits], "k-", lw=1.5,
                    label="limit: raw ONNX Runtime, best layout")
            same = _get(r, "limit", "same_layout")
            if same:
                ax.plot([x["streams"] for x in limits], [x["layouts"].get(same) for x in limits], "-.", color="grey",
                        label=f"raw ONNX Runtime, {same}")
        ax2.axhline(0.9, color="k", lw=1, ls=":", label="target 0.9")
        ax2.axhline(1.0, color="k", lw=1)
        for a in (ax, ax2):
            a.set_xscale("log", base=2)
            a.set_xlabel("camera streams (closed loop, one frame in flight each)")
            a.set_ylim(bottom=0)
            a.grid(alpha=0.3)
        ax.set_ylabel("processed frames/s")
        ax.set_title("Throughput (median of the rounds)")
        ax.legend(fontsize=7, loc="lower right")
        ax2.set_ylabel("x the limit measured in the same round")
        ax2.set_title("Throughput / limit")
        ax2.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(bench_dir / "throughput.png", dpi=110)
        plt.close(fig)
        made["throughput"] = "bench/throughput.png"

    if _rows(r, "latency", "appliance"):
        fig, ax = plt.subplots(figsize=(9.5, 4.2))
        for key, label, _, colour in SERIES:
            rows = _rows(r, "latency", key)
            if not rows:
                continue
            xs = [x["streams"] for x in rows]
            ax.plot(xs, [x["beyond_inference_ms"]["p50"] for x in rows], "o-", color=colour, label=f"{label} p50")
            ax.plot(xs, [x["beyond_inference_ms"]["p99"] for x in rows], "o--", color=colour, label=f"{label} p99")
        ax.axhline(5, color="k", lw=1, ls=":", label="target p50 5 ms")
        ax.axhline(20, color="k", lw=1, ls="-.", label="target p99 20 ms")
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=10)
        highest = max([25.0] + [x["beyond_inference_ms"]["p99"] or 0.0 for key, *_ in SERIES
                                for x in _rows(r, "latency", key)])
        # below: a p50 just under the raw per-frame work reads as slightly negative; above: room over the p99s
        ax.set_ylim(bottom=-5, top=highest * 1.6)
        ax.set_xlabel("camera streams (open loop, evenly spaced, 70 % of the system's own throughput)")
        ax.set_ylabel("end-to-end latency minus per-frame work (ms)")
        ax.set_title("Latency beyond inference at 70 % load")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.tight_layout()
        fig.savefig(bench_dir / "latency.png", dpi=110)
        plt.close(fig)
        made["latency"] = "bench/latency.png"

    ov = r.get("overload")
    if isinstance(ov, dict) and ov.get("rss_series"):
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
        for role, points in ov["rss_series"].items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=role)
        ax.set_xlabel("seconds under overload")
        ax.set_ylabel("resident memory (MB)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"RSS at {ov['offered_fps'] / ov['capacity_fps']:.1f} x capacity, {ov['streams']} streams")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        streams = ov["per_stream_fps"]
        ax2.bar(list(streams), list(streams.values()), color="C0")
        ax2.set_xlabel("stream")
        ax2.set_ylabel("processed frames/s")
        ax2.set_title(f"Per stream (max/min {_f(ov.get('fairness'), 3)})")
        ax2.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(bench_dir / "overload.png", dpi=110)
        plt.close(fig)
        made["overload"] = "bench/overload.png"
    return made


# --- markdown ------------------------------------------------------------------------------------


def _mark(v: Any, goal: float) -> str:
    return f"{_f(v, 2)}" + (" **MISSED**" if isinstance(v, (int, float)) and v < goal else "")


def _sweep_table(rows: list[dict[str, Any]], limits: dict[int, dict[str, Any]], with_naive: bool,
                 limit_goal: float = LIMIT_GOAL) -> list[str]:
    lines = [("| streams | frames/s (rounds) | limit(k) frames/s (layout) | x limit(k) | x raw, same layout | "
              + ("x naive | " if with_naive else "")
              + "latency p50 / p99 (ms) | in daemon p50 / p99 (ms) | worker decode / infer (ms) | CPU % of one core "
                "| others' CPU % |"),
             "| ---: | ---: | ---: | ---: | ---: | " + ("---: | " if with_naive else "") + "---: | ---: | ---: | --- | ---: |"]
    for x in rows:
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in (x.get("cpu_percent") or {}).items())
        rounds = "/".join(f"{v:.0f}" for v in x.get("rounds_fps", []))
        worker = x.get("worker") or {}
        naive = f"{_mark(x.get('x_naive'), NAIVE_GOAL)} | " if with_naive else ""
        lim = limits.get(x["streams"], {})
        layouts = lim.get("layouts") or {}
        best = max(layouts, key=lambda k: layouts[k] or 0) if layouts else "–"
        x_limit = _mark(x.get("x_limit"), limit_goal) if with_naive else _f(x.get("x_limit"), 2)
        lines.append(
            f"| {x['streams']} | {x['fps']:.1f} ({rounds}) | {_f(lim.get('fps'))} ({best}) | "
            f"{x_limit} | {_f(x.get('x_same_layout'), 2)} | {naive}"
            f"{_f(x['latency_ms']['p50'])} / {_f(x['latency_ms']['p99'])} | "
            f"{_f(x['in_system_ms']['p50'])} / {_f(x['in_system_ms']['p99'])} | "
            f"{_f(worker.get('decode_ms'))} / {_f(worker.get('infer_ms'))} | {cpu} | {_foreign(x)} |")
    return lines


def _beyond_raw(x: dict[str, Any]) -> str:
    raw = x.get("beyond_raw_work_ms") or {}
    return f"{_f(raw.get('p50'))} / {_f(raw.get('p99'))}" if raw else "–"


def _latency_table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = [("| system | streams | phases | offered / got (frames/s) | lost | beyond inference p50 / p99 (ms) | "
             "minus raw work p50 / p99 (ms) | end to end p50 / p99 (ms) | in daemon p50 / p99 (ms) | "
             "transport p50 (ms) | others' CPU % |"),
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, x in rows:
        lines.append(f"| {key} | {x['streams']} | {x['phases']} | {x['offered_fps']:.1f} / {x['fps']:.1f} | "
                     f"{x['unanswered']} of {x['sent']} | "
                     f"{_f(x['beyond_inference_ms']['p50'])} / {_f(x['beyond_inference_ms']['p99'])} | "
                     f"{_beyond_raw(x)} | "
                     f"{_f(x['latency_ms']['p50'])} / {_f(x['latency_ms']['p99'])} | "
                     f"{_f(x['in_system_ms']['p50'])} / {_f(x['in_system_ms']['p99'])} | "
                     f"{_f(x['transport_ms']['p50'], 2)} | {_foreign(x)} |")
    return lines


def _section_error(r: dict[str, Any], key: str) -> list[str]:
    v = r.get(key)
    if isinstance(v, dict) and "error" in v:
        return [f"**This part failed:** `{v['error']}`", ""]
    return []


def _conditions(r: dict[str, Any]) -> list[str]:
    c = r.get("conditions", {})
    plan = r.get("plan", {})
    return [
        "## Conditions", "",
        (f"- Machine: {c.get('nproc')} cores ({c.get('cpu_model')}), {c.get('memory_gb')} GB, Linux "
         f"{c.get('kernel')}; Python {c.get('python')}, ONNX Runtime {c.get('onnxruntime')} (CPU), "
         f"{c.get('mosquitto')}; appliance {c.get('appliance')} at `{c.get('git')}`; {c.get('date')}; the run "
         f"took {_f(r.get('elapsed_s'), 0)} s."),
        (f"- Model: `{_get(c, 'model', 'name')}` — {_get(c, 'model', 'description')} Input "
         f"{_get(c, 'model', 'input')}; {_get(c, 'model', 'file_mb')} MB file. Built by `bench/models.py`."),
        (f"- Frames: {_get(c, 'frames', 'count')} different {_get(c, 'frames', 'size')}, "
         f"{_get(c, 'frames', 'mean_bytes')} bytes on average, encoded before the run."),
        (f"- Threads: the appliance's worker runs {_get(c, 'threads', 'appliance_executors')} executor threads "
         f"(one per core, the default on a CPU partition) sharing one session with "
         f"{_get(c, 'threads', 'appliance_intra_op')} intra-op thread(s) (1, its default there: no thread pool, "
         "each executor runs the model on its own thread); the naive baseline uses one thread with "
         f"{_get(c, 'threads', 'naive')} intra-op threads (one per core, ONNX Runtime's default); both 1 inter-op "
         "thread, sequential execution. A frame that has the worker to itself (and no two frames met in it for "
         "half a second) runs on a second session of the model with a thread per core, not spinning."),
        ("- The limit at k streams, *limit(k)*: raw ONNX Runtime on the same machine, model and frames, doing the "
         "same work (decode, preprocess, infer, decode the outputs) in tight loops, in the best of the layouts "
         "that have at most k frames in flight: one process with 1, 2, 4, ... loops sharing a session with the "
         "cores shared out among them (one loop with a thread per core for k = 1), and one process per core "
         "with one thread each (pinned). *x raw, same layout* compares with raw ONNX Runtime in the layout the "
         "appliance itself uses at k (one loop with a thread per core at k = 1, a loop per executor above)."),
        ("- Broker: Mosquitto on loopback for the appliance and the naive baseline (the same broker; the naive "
         "baseline listens on other topics); the appliance with its embedded broker (amqtt, MQTT 3.1.1) as a "
         "third system. Frames are QoS 0 and carry their send time as the MQTT 5 user property `ts`, so each "
         "result is matched to its frame (on amqtt: to the newest frame of its source sent before it arrived)."),
        ("- Load: *closed loop* = each stream keeps one frame in flight and sends the next when its result "
         "arrives: throughput as fast as the system takes frames, with no queue anywhere. *Open loop* = each "
         "stream publishes at a fixed rate; used at 70 % of each system's own closed-loop throughput at the "
         "same stream count for latency (streams evenly spaced; once with random phases, as independent cameras "
         "are), and at 2x capacity for overload."),
        ("- Interleaving: the limit (raw ONNX Runtime, sessions kept loaded), the appliance on Mosquitto, the "
         "appliance with its embedded broker and the naive baseline all run at once, idle but for the one "
         f"being measured. At each stream count, {plan.get('rounds')} round(s) measure each system once in a "
         "rotating order, and every ratio is between measurements of the same round (median over rounds). "
         "*Others' CPU* is what other users of this shared machine took meanwhile (% of one core). Each "
         f"measurement waits (up to 30 s) for others to use under {plan.get('quiet_percent')} %, and one "
         f"disturbed by more is taken again (up to {plan.get('tries')} times, the quietest kept); this run "
         f"waited {_f(r.get('waited_s'), 0)} s and retried {r.get('retries', 0)} times."),
        ("- *Latency beyond inference* = for each frame, the end-to-end latency seen by the load client "
         "(publish -> result received) minus that frame's own work (decode + preprocess + infer + outputs) as the "
         "system timed it and reported in its result (`work_s`): what the pipeline adds to the work — MQTT both "
         "ways, hand-offs, waiting for a free executor. *Minus raw work* = end to end minus the per-frame work "
         "(p50) of raw ONNX Runtime in the appliance's own layout, measured in the same rounds (the measure "
         "used before `work_s` existed: a frame that runs alone while the raw loops all ran at once is faster "
         "than that p50, so it flatters layouts whose frames share a thread pool). *In daemon* = the result's "
         "`done - arrived`; *transport* = end to end minus in daemon (MQTT both ways, JSON)."),
        "- The load client runs on the same 2 cores as the system under test (its CPU share is in the tables).",
        ""]


def _markdown(r: dict[str, Any], plots: dict[str, str]) -> str:
    lim = r.get("limit", {}) if isinstance(r.get("limit"), dict) else {}
    limits = {x["streams"]: x for x in _rows(r, "limit_rounds")}
    L: list[str] = []
    quick = " (QUICK MODE: smoke-test durations, the figures are noise)" if _get(r, "conditions", "quick") else ""
    L += ["# Benchmarks" + quick, "",
          ("Generated by `make bench` (`python -m bench.run`; raw results in `docs/bench/results.json`); do not "
           "edit by hand. Every figure was measured in one run, on one machine, with the same model, frames and "
           "thread settings, and is given as a ratio to a baseline measured close to it in time in the same run "
           "(the machine is shared and noisy: absolute numbers move between runs, ratios much less)."), ""]
    L += _conditions(r)
    L += ["## Targets", "", "| target | goal | measured | ratio | status |", "| --- | --- | --- | ---: | --- |"]
    for t in r.get("targets", []):
        status = "met" if t["met"] else ("**MISSED**" if t["met"] is False else "–")
        note = f" ({t['note']})" if t.get("note") else ""
        L.append(f"| {t['target']} | {t['goal']} | {t['measured']}{note} | {_f(t['ratio'], 2)} | {status} |")
    if r.get("failed"):
        L.append(f"\nParts that failed: {', '.join(r['failed'])}.")
    L.append("")

    L += ["## 1. The limit: raw ONNX Runtime", ""] + _section_error(r, "limit")
    if lim.get("layouts"):
        L += [("| layout | work | frames/s | per frame p50 / p99 (ms) | decode / preprocess / infer p50 (ms) | "
              "others' CPU % |"), "| --- | --- | ---: | ---: | --- | ---: |"]
        for x in lim["layouts"]:
            stages = " / ".join(f"{v:.2f}" for v in x["stage_ms"].values()) if x["mode"] == "pipeline" else "–"
            work = "decode + preprocess + infer" if x["mode"] == "pipeline" else "infer only (reference)"
            L.append(f"| {x['name']} | {work} | {x['fps']:.1f} | {x['per_frame_ms']['p50']:.2f} / "
                     f"{x['per_frame_ms']['p99']:.2f} | {stages} | {_foreign(x)} |")
        end: dict[str, Any] = r["limit_end"] if isinstance(r.get("limit_end"), dict) else {}
        L += ["", (f"Best layout: **{lim.get('best')}, {lim.get('fps')} frames/s**; in the appliance's layout "
                   f"({lim.get('same_layout')}) {lim.get('same_layout_fps')} frames/s, "
                   f"{_f(lim['same_layout_fps'] / lim['fps'] if lim.get('fps') else None, 2)} x the best. "
                   f"Measured again at the end of the run: {_f(end.get('fps'))} frames/s (end/start "
                   f"{_f(lim.get('drift'), 3)}). One session: {lim.get('session_mb')} MB resident, "
                   f"{lim.get('load_s')} s to create and warm up. In the throughput rounds below the limit is "
                   "measured again at every stream count (column *limit frames/s*)."), ""]

    L += ["## 2. The appliance end to end, and 3. the naive baseline", ""]
    L += _section_error(r, "appliance") + _section_error(r, "naive")
    if "throughput" in plots:
        L += [f"![throughput]({plots['throughput']})", ""]
    for key, title in (("appliance", "Appliance, Mosquitto"), ("appliance_embedded", "Appliance, embedded broker"),
                       ("naive", "Naive paho callback, Mosquitto")):
        rows = _rows(r, key)
        if rows:
            L += [f"**{title}** (closed loop):", ""]
            L += _sweep_table(rows, limits, key != "naive") + [""]

    L += ["## Latency at 70 % load", ""] + _section_error(r, "latency")
    lat = r.get("latency")
    if isinstance(lat, dict) and "error" not in lat:
        if "latency" in plots:
            L += [f"![latency]({plots['latency']})", ""]
        lat_rows = [(k, x) for k in ("appliance", "naive") for x in _rows(r, "latency", k)]
        lat_rows += [(k, x) for k in ("appliance", "naive") for x in _rows(r, "latency", "random_phases", k)]
        L += _latency_table(lat_rows)
        for key in ("appliance", "naive"):
            p = _get(lat, "pooled", key)
            if isinstance(p, dict):
                L.append(f"| {key} | all {len(p['streams'])} pooled | even | {p['results']} results | | "
                         f"**{_f(p['beyond_inference_ms']['p50'])} / {_f(p['beyond_inference_ms']['p99'])}** | "
                         f"{_beyond_raw(p)} | "
                         f"{_f(p['latency_ms']['p50'])} / {_f(p['latency_ms']['p99'])} | "
                         f"{_f(p['in_system_ms']['p50'])} / {_f(p['in_system_ms']['p99'])} | "
                         f"{_f(p['transport_ms']['p50'], 2)} | |")
        L += ["", (f"*Minus raw work* subtracts {_f(lat.get('work_ms'), 2)} ms (p50, raw ONNX Runtime, "
              f"{lim.get('same_layout')}). *Lost*: frames sent in the window that got no result."), ""]

    L += ["## 4. Overload", ""] + _section_error(r, "overload")
    ov = r.get("overload")
    if isinstance(ov, dict) and "fps" in ov:
        if "overload" in plots:
            L += [f"![overload]({plots['overload']})", ""]
        mem = "; ".join(f"{k} {v['start_mb']:.0f} -> {v['end_mb']:.0f} MB (slope {v['slope_mb_per_min']:+.3f} MB/min)"
                        for k, v in ov["memory"].items())
        cpu = ", ".join(f"{k} {v:.0f} %" for k, v in ov.get("cpu_percent", {}).items())
        L += [(f"{ov['streams']} streams offering {ov['offered_fps']:.1f} frames/s "
               f"({ov['offered_fps'] / ov['capacity_fps']:.1f} x the closed-loop throughput at {ov['streams']} "
               f"streams, {ov['capacity_fps']:.1f}) for {ov['seconds']:.0f} s: processed {ov['fps']:.1f} frames/s "
               f"({ov['fps'] / ov['capacity_fps']:.2f} x), {_f((ov.get('skipped_fraction') or 0) * 100)} % of "
               f"frames skipped (latest frame wins). Per-stream fairness max/min = {_f(ov.get('fairness'), 3)}. "
               f"Frame age (publish -> result) p50 {_f(ov['frame_age_ms']['p50'])} ms, p99 "
               f"{_f(ov['frame_age_ms']['p99'])} ms, max {_f(ov['frame_age_ms']['max'])} ms, against a closed-loop "
               f"p99 of {_f(ov.get('closed_loop_p99_ms'))} ms at the same stream count. Memory: {mem}. CPU: {cpu}; "
               f"others' CPU {_f(ov.get('foreign_percent'), 0)} %."), ""]

    L += ["## 5. Idle footprint", ""] + _section_error(r, "idle")
    idle = r.get("idle")
    if isinstance(idle, dict):
        L += ["| broker | process | RSS (MB) | PSS (MB) | CPU (% of one core) |", "| --- | --- | ---: | ---: | ---: |"]
        for broker, x in idle.items():
            if not isinstance(x, dict) or "processes" not in x:
                L += [f"| {broker} | failed: {_get(x, 'error')} | | | |"]
                continue
            for role, p in x["processes"].items():
                L.append(f"| {broker} | {role} | {p['rss_mb']:.1f} | {_f(p['pss_mb'])} | {p['cpu_percent']:.3f} |")
            L.append(f"| {broker} | **total** over {x['seconds']:.0f} s | **{x['rss_mb']:.1f}** | {x['pss_mb']:.1f} | "
                     f"**{x['cpu_percent']:.3f}** |")
        L += ["", ("Daemon, embedded broker (if any) and worker, no models, no traffic. RSS counts shared pages "
                   "once per process (the sum overstates); PSS divides them. The resource tracker is Python's "
                   "multiprocessing helper process."), ""]

    L += ["## 6. Hot swap under load", ""] + _section_error(r, "hot_swap")
    sw = r.get("hot_swap")
    if isinstance(sw, dict) and "lost" in sw:
        L += [(f"{sw['streams']} streams at {sw['offered_fps']:.1f} frames/s (70 % load, evenly spaced), "
               f"`appliance apps add` of a v2 app whose model is a v2 copy of the model: {sw['sent']} frames sent, "
               f"{sw['results']} results; **{sw['lost_during_swap']} lost** of the frames sent in the "
               f"{sw['swap_window_s']:.1f} s from the command to v1's unloading (+1 s), {sw['lost_outside_swap']} "
               f"outside it; {sw['daemon']['rejected']} failed; {sw['daemon']['skipped']} skipped by the daemon in "
               f"all (latest frame wins). The swap took **{sw['swap_s']:.2f} s** from the command to the app "
               f"running v2 ({sw['cli_s']:.2f} s of it the CLI itself; the daemon polls for changes every second; "
               f"a raw session loads and warms up in {_f(lim.get('load_s'), 3)} s) and v1 was unloaded after "
               f"{sw['unload_s']:.2f} s. Latency p99 during the swap {_f(sw['latency_during_ms']['p99'])} ms "
               f"(max {_f(sw['latency_during_ms']['max'])}) against {_f(sw['latency_outside_ms']['p99'])} ms "
               f"outside it; the longest gap between two results of one stream {_f(sw['max_result_gap_ms'])} ms "
               f"against a frame interval of {sw['frame_interval_ms']} ms. Daemon note: \"{sw['note']}\"."), ""]

    L += ["## 7. Memory per extra model in a partition", ""] + _section_error(r, "memory_per_model")
    mm = r.get("memory_per_model")
    if isinstance(mm, dict) and "steps" in mm:
        L += ["| models loaded | worker RSS (MB) | worker PSS (MB) | memory_mb per model in /api/status |",
              "| ---: | ---: | ---: | --- |"]
        for s in mm["steps"]:
            L.append(f"| {s['models']} | {s['rss_mb']} | {_f(s['pss_mb'])} | "
                     f"{', '.join(map(str, s['reported_mb'])) or '–'} |")
        session = lim.get("session_mb")
        extra = mm.get("per_extra_model_mb")
        ratio = f" = {extra / session:.2f} x" if extra and session else ""
        L += ["", (f"The first model adds {mm['first_model_mb']} MB to the worker (ONNX Runtime itself and the "
                   f"session); each extra copy (another name, the same graph) adds **{_f(extra)} MB**{ratio} the "
                   f"memory one raw session adds to a fresh process in this run ({session} MB)."), ""]

    L += _fewer_cores(r)

    L += ["## 9. Memory as cameras come and go", ""] + _section_error(r, "source_churn")
    ch = r.get("source_churn")
    if isinstance(ch, dict) and "steps" in ch:
        L += ["| step | daemon RSS (MB) | latest frames held (MB) | sources remembered |", "| --- | ---: | ---: | ---: |"]
        for s in ch["steps"]:
            L.append(f"| {s['step']} | {s['rss_mb']:.1f} | {s['frames_mb']:.1f} | {s['sources']} |")
        L += ["", (f"Two waves of {ch['cameras']} cameras that no one has seen before, each sending one "
                   f"{ch['frame_bytes'] / 1e6:.1f} MB JPEG ({ch['received_mb']:.0f} MB in all), published "
                   f"{ch['batch']} at a time and served before the next; between and after the waves a silence as "
                   f"long as `ingest.source_forget_s` ({ch['forget_s']:g} s here). The console's latest frames "
                   f"share `ingest.latest_frames_bytes` ({ch['budget_mb']:.0f} MB, the default), a forgotten "
                   "camera's frame goes with it, and the daemon gives the freed memory back to the system "
                   f"(`malloc_trim`). RSS after the second wave / after the first: **{ch['second_x_first']:.3f}**; "
                   f"at the end / before: **{ch['end_x_before']:.3f}**; peak {ch['peak_rss_mb']:.0f} MB."), ""]

    L += _cheap(r) + _designs(r)
    L += _profile(r.get("profile"), "## Profile (py-spy, own time per function)")
    return "\n".join(L) + "\n"


def _profile(prof: Any, title: str) -> list[str]:
    if not isinstance(prof, dict) or "main" not in prof:
        return []
    L = [title, "", f"Closed loop, {prof['streams']} streams, {prof['fps']} frames/s while sampled.", ""]
    for role in [k for k in prof if k not in ("streams", "fps")]:
        p = prof[role]
        if not isinstance(p, dict) or "own_percent" not in p:
            continue
        L += [f"**{role}** ({p['samples']} samples, raw stacks in `bench/{p['raw']}`):", ""]
        L += [f"- {share:.1f} % {fn}" for fn, share in p["own_percent"][:8]] + [""]
    return L


def _cheap(r: dict[str, Any]) -> list[str]:
    if "cheap" not in r:
        return []
    L = ["## 10. A cheap model: the pipeline's own cost", ""] + _section_error(r, "cheap")
    c = r["cheap"]
    if not isinstance(c, dict) or "appliance" not in c:
        return L
    ref = c.get("reference", {})
    infer = next((x for x in ref.get("layouts", []) if x["mode"] == "infer" and x["processes"] == r.get("cores")),
                 None)
    L += [(f"`{_get(c, 'model', 'name')}` — {_get(c, 'model', 'description')} "
           f"{_f((_get(c, 'model', 'bytes') or 0) / 1e6, 2)} MB file; inference alone "
           f"{_f(_get(infer, 'per_frame_ms', 'p50'), 2)} ms per frame on one core "
           f"({_get(infer, 'name')}), the whole work (decode, preprocess, infer) "
           f"{_f(c.get('work_ms'), 2)} ms in the appliance's layout. Same frames, same interleaving as sections 2 "
           "and 3."), ""]
    limits = {x["streams"]: x for x in _rows(r, "cheap", "limit")}
    for key, title in (("appliance", "Appliance, Mosquitto"), ("naive", "Naive paho callback, Mosquitto")):
        rows = _rows(r, "cheap", key)
        if rows:
            L += [f"**{title}** (closed loop):", ""]
            L += _sweep_table(rows, limits, key != "naive", CHEAP_GOAL if key != "naive" else LIMIT_GOAL) + [""]
    L += [("CPU per frame (ms of one core; the worker's beyond the raw work, which keeps every core busy for "
           "1/limit(k) s per frame):"), "", "| streams | per process |", "| ---: | --- |"]
    for x in _rows(r, "cheap", "appliance"):
        L.append(f"| {x['streams']} | {_cpu_per_frame(x, limits.get(x['streams']), r.get('cores'))} |")
    L.append("")
    L += _profile(c.get("profile"), "**Profile of the cheap model** (py-spy, own time per function):")
    return L


def _designs(r: dict[str, Any]) -> list[str]:
    if "designs" not in r:
        return []
    L = ["## 11. Worker designs side by side", ""] + _section_error(r, "designs")
    d = r["designs"]
    if not isinstance(d, dict) or "error" in d:
        return L
    streams = [x["streams"] for x in next(iter(d.values()))["rows"]] if d else []
    L += [("The appliance on Mosquitto with each layout of its CPU worker the settings allow, closed loop; each "
           "measurement beside limit(k) measured just before it. *Memory* is what the worker grew by loading "
           "the model (both sessions where there are two)."), "",
          ("| worker layout | settings | " + " | ".join(f"{n} streams: fps (x limit(k))" for n in streams)
           + " | memory (MB) |"), "| --- | --- | " + " | ".join("---:" for _ in streams) + " | ---: |"]
    for x in d.values():
        cells = " | ".join(f"{row['fps']:.1f} ({_f(row['x_limit'], 2)})" for row in x["rows"])
        settings = x["settings"].replace("[runtime]\n", "").replace("\n", ", ") or "–"
        L.append(f"| {x['label']} | `{settings}` | {cells} | {_f(x.get('memory_mb'))} |")
    L.append("")
    return L


def _fewer_cores(r: dict[str, Any]) -> list[str]:
    if "fewer_cores" not in r:
        return []
    L = ["## 8. The same comparison on fewer cores", ""] + _section_error(r, "fewer_cores")
    rows = _rows(r, "fewer_cores")
    if not rows:
        return L
    n = rows[0]["streams"]
    all_cores = _get(r, "conditions", "nproc")
    app, naive, lim = (_row(_rows(r, key), n) for key in ("appliance", "naive", "limit_rounds"))
    table = [(x["cores"], x["limit"]["fps"], x["appliance"], x["naive"]) for x in rows]
    if app and naive and lim and all_cores:
        table.append((f"{all_cores} (section 2)", lim["fps"], app, naive))
    L += [(f"{n} streams, closed loop, with the whole stack confined to the first cores of the machine "
           "(`sched_setaffinity`, inherited by the broker, the daemon and its worker, the naive baseline and "
           "the limit's processes; the load client runs on them too). The appliance plans its CPU partition "
           "for the cores it sees, the naive baseline runs one intra-op thread per core, and the limit takes "
           "its best layout on them. Each row's ratios are between measurements of the same rounds."), "",
          ("| cores | limit frames/s | appliance frames/s | appliance x limit | naive frames/s | naive x limit | "
          "appliance x naive | CPU % of one core (appliance / naive) | others' CPU % (appliance / naive rounds) |"),
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for cores, limit_fps, a, nv in table:
        cpu = " / ".join(", ".join(f"{role} {v:.0f}" for role, v in x["cpu_percent"].items()) for x in (a, nv))
        L.append(f"| {cores} | {_f(limit_fps)} | {_f(a['fps'])} | {_f(a['x_limit'], 2)} | {_f(nv['fps'])} | "
                 f"{_f(nv['x_limit'], 2)} | {_f(a.get('x_naive'), 2)} | {cpu} | {_foreign(a)} / {_foreign(nv)} |")
    L += ["", ("The naive baseline decodes and preprocesses each frame on one thread and splits only the "
               "inference of that frame across the cores; the appliance runs one frame per core. The columns "
               "*x limit* show how much of the machine each of them uses as cores are added."), ""]
    return L


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write ``out/BENCHMARKS.md`` and ``out/bench/*.png`` from ``results``; returns the markdown path."""
    bench_dir = out / "bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    results["targets"] = evaluate_targets(results)
    plots = _plots(results, bench_dir)
    path = out / "BENCHMARKS.md"
    path.write_text(_markdown(results, plots), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m bench.report RESULTS_JSON OUT_DIR", file=sys.stderr)
        return 2
    source = Path(args[0])
    results = json.loads(source.read_text(encoding="utf-8"))
    print(write_report(results, Path(args[1])))
    source.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")  # with the targets re-evaluated
    return 0


if __name__ == "__main__":
    sys.exit(main())
