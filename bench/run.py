"""Run every benchmark in one go and write the report: ``python -m bench.run [--quick] [--out docs]``.

Writes ``OUT/BENCHMARKS.md``, ``OUT/bench/results.json`` and ``OUT/bench/*.png``. ``--quick`` runs each
part for a fraction of a second (the smoke test uses it; its figures are noise); the full run takes
about a quarter of an hour, five minutes of it the overload. ``--profile`` also samples the daemon and
its worker with py-spy under load. A part that fails is reported as failed, the others still run, and
the exit status is 1.

Order: the limit's processes, the appliance on Mosquitto, the appliance with its embedded broker and
the naive baseline are started and kept running; the limit's reference table; the throughput sweep
(all systems interleaved, see ``bench.compare``); latency at 70 % load; profile; overload; hot swap;
everything but Mosquitto is stopped; memory per model; memory as cameras come and go; the comparison at 8
streams again with the whole stack confined to fewer cores (1, 2, 4, ... below the machine's); the idle
footprints; the limit's table again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import compare as C
from bench import sections as S
from bench.limit import LimitPool
from bench.load import LoadClient
from bench.models import build_bench_model
from bench.naive import RESULTS_TOPIC as NAIVE_RESULTS
from bench.procs import Appliance, BenchError, Mosquitto, wait_until
from bench.report import write_report

log = logging.getLogger("bench")

FRAMES_FULL = 32  # different pre-encoded frames
FRAMES_QUICK = 8
NAIVE_PREFIX = "naivecams"  # the naive baseline's camera topics, apart from the appliance's
DESIGN_PREFIX = "designcams"  # the worker designs' camera topics: the main appliance shares their broker


def _frames(count: int) -> list[bytes]:
    from appliance.demo.scene import render_frame

    return [render_frame(i * 0.37, i % 8) for i in range(count)]


class Runner:
    def __init__(self, ctx: S.Context, profile: bool) -> None:
        self.ctx = ctx
        self.profile = profile
        plan = ctx.plan
        self.quiet = C.Quiet(plan.tries, plan.quiet_percent, plan.retry_budget_s)
        self.results: dict[str, Any] = {}
        self.failed: list[str] = []
        self._pool_layouts: list[tuple[int, int, int]] = []  # (processes, threads, loops) of the limit's layouts
        self.drain_s = 0.2 if plan.quick else 0.5  # open loop: results still collected after the last frame

    def part(self, key: str, fn: Callable[[], Any]) -> Any:
        """Run one part; a failure is recorded under ``key`` and does not stop the others."""
        log.info("%s ...", key)
        t0 = time.monotonic()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - recorded in the report, the other parts still run
            log.error("%s failed: %s: %s", key, type(e).__name__, e)
            log.debug("%s", traceback.format_exc())
            self.failed.append(key)
            value = {"error": f"{type(e).__name__}: {e}"}
        log.info("%s done in %.1f s", key, time.monotonic() - t0)
        return value

    def run(self) -> dict[str, Any]:
        ctx, plan, r = self.ctx, self.ctx.plan, self.results
        r["plan"] = dict(vars(plan))
        r["cores"] = ctx.threads
        r["conditions"] = self.part("conditions", lambda: S.conditions(ctx))
        with Mosquitto(ctx.workdir) as broker:
            with ExitStack() as stack:
                systems = self.part("start", lambda: self._start(stack, broker))
                if isinstance(systems, C.Systems):
                    self._compare(systems, broker)
                else:
                    for key in ("limit", "appliance", "naive", "latency", "overload", "hot_swap"):
                        r[key] = systems
            r["cheap"] = self.part("cheap model", lambda: self._cheap(broker))
            r["memory_per_model"] = self.part("memory_per_model", lambda: S.memory_per_model(ctx, broker.port))
            r["source_churn"] = self.part("source churn", lambda: S.source_churn(ctx, broker.port))
        if isinstance(r.get(C.APPLIANCE), list) and len(os.sched_getaffinity(0)) > 1:
            r["fewer_cores"] = self.part("fewer cores", self._fewer_cores)
        r["idle"] = {"embedded": self.part("idle (embedded broker)", lambda: S.idle(ctx, with_mosquitto=False)),
                     "mosquitto": self.part("idle (mosquitto)", lambda: S.idle(ctx, with_mosquitto=True))}
        if "error" not in r.get("limit", {}) and not plan.quick:
            r["limit_end"] = self.part("limit (again)", self._limit_again)
            if "error" not in r["limit_end"]:
                r["limit"]["drift"] = round(r["limit_end"]["fps"] / r["limit"]["fps"], 3)
        r["retries"] = self.quiet.retried
        r["waited_s"] = round(self.quiet.waited_s, 1)
        return r

    def _start(self, stack: ExitStack, broker: Mosquitto, embedded: bool = True, extra: str = "") -> C.Systems:
        ctx = self.ctx
        n = ctx.threads
        pools = {}
        executors, intra_op = S.worker_layout()
        for processes, threads, loops in S.limit_layouts(n, executors, intra_op):
            pool = stack.enter_context(LimitPool(ctx.model_dir, ctx.frames, processes, threads, loops))
            pools[pool.name] = pool
        same = next(p.name for p in pools.values() if p.processes == 1 and p.loops == executors) \
            if executors > 1 else next(p.name for p in pools.values() if p.processes == 1)
        alone = next(p.name for p in pools.values() if (p.processes, p.loops, p.threads) == (1, 1, n)) \
            if executors > 1 else None
        self._pool_layouts = [(p.processes, p.threads, p.loops) for p in pools.values()]
        s = C.Systems(pools, same, alone)
        started = []
        for name, port in ((C.APPLIANCE, broker.port), (C.EMBEDDED, None))[: 2 if embedded else 1]:
            daemon = stack.enter_context(Appliance(ctx.workdir, broker_port=port, extra=extra))
            S.install_bench_app(ctx, daemon)
            daemon.start(wait=False)  # both start side by side: each waits on its own imports and model load
            started.append((name, port, daemon))
        for name, port, daemon in started:
            daemon.wait_healthy()
            wait_until(lambda daemon=daemon: daemon.serving("bench"), S.SERVE_TIMEOUT_S,  # type: ignore[misc]
                       f"the bench app serving ({name})")
            client = stack.enter_context(LoadClient(daemon.mqtt_port, daemon.results_topic, ctx.frames,
                                                    mqtt5=port is not None, drain_s=self.drain_s))
            pids: dict[str, int | None] = {"daemon": daemon.pid, **daemon.worker_pids()}
            if port is not None:
                pids["mosquitto"] = broker.pid
            s.systems[name] = C.System(name, client, pids, daemon)
        naive = stack.enter_context(S.naive_process(ctx, broker.port, mqtt5=True, prefix=NAIVE_PREFIX))
        client = stack.enter_context(LoadClient(broker.port, NAIVE_RESULTS, ctx.frames, mqtt5=True,
                                                prefix=NAIVE_PREFIX, drain_s=self.drain_s))
        s.systems[C.NAIVE] = C.System(C.NAIVE, client, {"naive": naive.pid, "mosquitto": broker.pid})
        return s

    def _fewer_cores(self) -> list[dict[str, Any]]:
        """The limit, the appliance (on Mosquitto) and the naive baseline at ``cores_streams`` streams, closed
        loop and interleaved as in the sweep, with everything confined to the first 1, 2, 4, ... cores (fewer
        than the machine's): the affinity is set on this thread, and the broker, the daemon and its worker, the
        naive baseline and the limit's processes, all started from it, inherit it; the load client runs on it.
        The appliance plans its partition for the cores it sees, the naive baseline takes one intra-op thread
        per core, and the limit tries its layouts on them."""
        ctx = self.ctx
        mine = sorted(os.sched_getaffinity(0))
        plan = replace(ctx.plan, streams=(ctx.plan.cores_streams,), embedded_streams=())
        rows: list[dict[str, Any]] = []
        for k in (c for c in (1, 2, 4, 8, 16, 32, 64) if c < len(mine)):
            sub = replace(ctx, plan=plan, workdir=ctx.workdir / f"cores-{k}", threads=k)
            sub.workdir.mkdir(parents=True)
            log.info("fewer cores: %d of %d", k, len(mine))
            os.sched_setaffinity(0, mine[:k])
            try:
                with Mosquitto(sub.workdir) as broker, ExitStack() as stack:
                    sweep = C.sweep(sub, Runner(sub, False)._start(stack, broker, embedded=False), self.quiet)
            finally:
                os.sched_setaffinity(0, mine)
            limit, app, naive = sweep[C.LIMIT][0], sweep[C.APPLIANCE][0], sweep[C.NAIVE][0]
            keep = ("fps", "x_limit", "rounds_fps", "cpu_percent", "foreign_percent")
            rows.append({"cores": k, "streams": plan.cores_streams,
                         "limit": {"fps": limit["fps"], "layouts": limit["layouts"]},
                         C.APPLIANCE: {**{key: app[key] for key in keep}, "x_naive": app.get("x_naive")},
                         C.NAIVE: {key: naive[key] for key in keep}})
        return rows

    def _cheap(self, broker: Mosquitto) -> dict[str, Any]:
        """The sweep again on a cheap model (about 1 ms per inference), where the pipeline's own cost is most of
        the story: limit, appliance (Mosquitto) and naive baseline interleaved, and a profile at 8 streams."""
        ctx = self.ctx
        model_dir = build_bench_model(ctx.workdir / "models" / S.CHEAP_MODEL, name=S.CHEAP_MODEL, width=S.CHEAP_WIDTH)
        plan = replace(ctx.plan, streams=ctx.plan.cheap_streams, embedded_streams=())
        sub = replace(ctx, plan=plan, model_dir=model_dir, workdir=ctx.workdir / "cheap")
        sub.workdir.mkdir(parents=True)
        card = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
        out: dict[str, Any] = {"model": {"name": S.CHEAP_MODEL, "description": card["description"],
                                         "bytes": (model_dir / "model.onnx").stat().st_size}}
        with ExitStack() as stack:
            systems = Runner(sub, False)._start(stack, broker, embedded=False)
            out["reference"] = C.reference(replace(sub, plan=replace(plan, limit_s=plan.limit_slice_s)), systems,
                                           self.quiet)
            sweep = C.sweep(sub, systems, self.quiet)
            app = systems.systems[C.APPLIANCE]
            if self.profile and app.daemon is not None:
                out["profile"] = S.profile(sub, app.client, app.daemon, plan.overload_streams, name="cheap-")
        out.update({key: sweep[key] for key in (C.LIMIT, C.APPLIANCE, C.NAIVE)})
        out["work_ms"] = sweep["work_ms"]
        return out

    def _designs(self, s: C.Systems, broker: Mosquitto) -> dict[str, Any]:
        """The worker's possible layouts side by side: the appliance on Mosquitto with each, closed loop at a few
        stream counts, each measurement beside the limit at that concurrency in the same round."""
        ctx, plan = self.ctx, self.ctx.plan
        cores = ctx.threads
        out: dict[str, Any] = {}
        designs = S.worker_designs(cores)
        with ExitStack() as stack:
            # each on a camera prefix of its own, so that only the one measured gets the frames
            prefixes = [f"{DESIGN_PREFIX}-{key}" for key, _, _ in designs]
            daemons = [stack.enter_context(Appliance(ctx.workdir / f"design-{key}", broker_port=broker.port,
                                                     extra=f'[topics]\ncameras = "{prefix}"\n' + extra))
                       for (key, _, extra), prefix in zip(designs, prefixes)]

            def ready(daemon: Appliance, prefix: str) -> None:
                S.install_bench_app(ctx, daemon, prefix=prefix)
                daemon.start()
                wait_until(lambda: daemon.serving("bench"), S.SERVE_TIMEOUT_S, f"the bench app serving ({prefix})")

            # started side by side (each start waits on imports and a model load), measured one at a time: the
            # others idle meanwhile
            with ThreadPoolExecutor(len(designs)) as pool:
                list(pool.map(ready, daemons, prefixes))
            for (key, label, extra), daemon, prefix in zip(designs, daemons, prefixes):
                client = stack.enter_context(LoadClient(daemon.mqtt_port, daemon.results_topic, ctx.frames,
                                                        mqtt5=True, prefix=prefix, drain_s=self.drain_s))
                pids: dict[str, int | None] = {"daemon": daemon.pid, **daemon.worker_pids(), "mosquitto": broker.pid}
                system = C.System(key, client, pids, daemon)
                rows = []
                for n in plan.design_streams:
                    limit = C.limit_at(ctx, s, self.quiet, n)
                    run, cpu = C.system_slice(ctx, system, n, self.quiet)
                    rows.append({"streams": n, "fps": round(run.throughput(), 2), "limit_fps": round(limit.fps, 2),
                                 "x_limit": round(run.throughput() / limit.fps, 3) if limit.fps else None,
                                 "latency_ms": C.latencies([run], [0.0])["latency_ms"],
                                 "cpu_percent": cpu["cpu_percent"], "foreign_percent": cpu["foreign_percent"],
                                 "worker": cpu.get("worker")})
                status = daemon.status()
                worker: dict[str, Any] = next((w for w in status.get("workers", []) if w.get("partition") == "cpu"), {})
                memory = next((m.get("memory_mb") for m in status.get("models", [])), None)
                out[key] = {"label": label, "settings": extra.strip(), "rows": rows, "memory_mb": memory,
                            "executors": worker.get("executors"), "threads": worker.get("threads"),
                            "alone_threads": worker.get("alone_threads")}
        return out

    def _compare(self, s: C.Systems, broker: Mosquitto) -> None:
        ctx, plan, r = self.ctx, self.ctx.plan, self.results
        r["limit"] = self.part("limit", lambda: C.reference(ctx, s, self.quiet))
        sweep = self.part("sweep", lambda: C.sweep(ctx, s, self.quiet))
        if "error" in sweep:
            for key in ("appliance", "appliance_embedded", "naive", "latency", "overload", "hot_swap"):
                r[key] = sweep
            return
        for key in (C.APPLIANCE, C.EMBEDDED, C.NAIVE):
            r[key] = sweep[key]
        r["limit_rounds"] = sweep[C.LIMIT]
        work_s = float(sweep["work_ms"]) / 1000
        capacity = {name: {row["streams"]: row["fps"] for row in sweep[name]} for name in (C.APPLIANCE, C.NAIVE)}
        r["latency"] = self.part("latency", lambda: {
            **C.latency(ctx, s, self.quiet, capacity, work_s, plan.streams, even=True),
            "random_phases": {} if plan.quick else C.latency(ctx, s, self.quiet, capacity, work_s,
                                                             (plan.overload_streams,), even=False),
            "work_ms": round(work_s * 1000, 3)})
        app = s.systems[C.APPLIANCE]
        assert app.daemon is not None
        daemon = app.daemon
        if self.profile:
            r["profile"] = self.part("profile", lambda: S.profile(ctx, app.client, daemon, plan.overload_streams))
        rows: dict[int, dict[str, Any]] = {row["streams"]: row for row in sweep[C.APPLIANCE]}

        def at(n: int) -> dict[str, Any]:
            return rows.get(n) or rows[max(rows)]

        r["overload"] = self.part("overload", lambda: S.overload(
            ctx, app.client, daemon, broker.pid, at(plan.overload_streams)["fps"],
            at(plan.overload_streams)["latency_ms"]["p99"]))
        r["hot_swap"] = self.part("hot_swap", lambda: S.hot_swap(
            ctx, app.client, daemon, at(plan.swap_streams)["fps"], work_s))
        r["designs"] = self.part("worker designs", lambda: self._designs(s, broker))

    def _limit_again(self) -> dict[str, Any]:
        ctx = self.ctx
        with ExitStack() as stack:
            pools = {}
            for processes, threads, loops in self._pool_layouts:
                pool = stack.enter_context(LimitPool(ctx.model_dir, ctx.frames, processes, threads, loops))
                pools[pool.name] = pool
            if not pools:
                raise BenchError("no limit layouts to measure again")
            same = next(p.name for p in pools.values() if p.processes == 1 and p.loops == max(x[2] for x in
                                                                                               self._pool_layouts))
            return C.reference(ctx, C.Systems(pools, same), self.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fraction of a second per part (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for BENCHMARKS.md and bench/ (docs)")
    parser.add_argument("--profile", action="store_true", help="also profile the daemon and worker with py-spy")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (daemon logs, state)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        import matplotlib  # noqa: F401 - the plots need it; fail before a quarter of an hour of measuring
    except ImportError:
        print("bench needs matplotlib: pip install -e '.[bench]' (or `make bench`)", file=sys.stderr)
        return 2
    plan = S.QUICK if args.quick else S.FULL
    out: Path = args.out
    (out / "bench").mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    t0 = time.monotonic()
    try:
        model_dir = build_bench_model(workdir / "models" / "bench-mobilenet")
        ctx = S.Context(plan=plan, model_dir=model_dir, frames=_frames(FRAMES_QUICK if args.quick else FRAMES_FULL),
                        workdir=workdir, threads=len(os.sched_getaffinity(0)), out_dir=out / "bench")
        runner = Runner(ctx, args.profile)
        results = runner.run()
        results["elapsed_s"] = round(time.monotonic() - t0, 1)
        results["failed"] = runner.failed
        path = write_report(results, out)  # adds the targets to results
        (out / "bench" / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    finally:
        if args.keep:
            log.info("working folder kept: %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    log.info("wrote %s and %s in %.0f s", path, out / "bench" / "results.json", time.monotonic() - t0)
    for t in results["targets"]:
        log.info("%-8s %s: %s (goal %s)", "met" if t["met"] else "MISSED", t["target"], t["measured"], t["goal"])
    if runner.failed:
        log.error("failed parts: %s", ", ".join(runner.failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
