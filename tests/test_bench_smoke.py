"""`make bench` still runs: the benchmark in its quick mode writes a complete report and its raw JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import SECTIONS

ROOT = Path(__file__).resolve().parent.parent
QUICK_TIMEOUT_S = 240  # the quick mode takes under a minute on a 2-core machine; this only bounds a hang

pytestmark = pytest.mark.slow


def test_quick_benchmark_writes_every_section(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=QUICK_TIMEOUT_S, check=False)
    assert r.returncode == 0, f"bench.run --quick failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    for section in SECTIONS:
        assert section in results, f"results.json has no {section!r}"
        value = results[section]
        assert not (isinstance(value, dict) and "error" in value), f"{section} failed: {value}"
    assert results["failed"] == []
    assert set(results["idle"]) == {"embedded", "mosquitto"}
    assert set(results["latency"]) >= {"appliance", "naive"}
    assert results["limit"]["fps"] > 0 and all(row["fps"] > 0 for row in results["appliance"])
    assert results["targets"], "the targets were evaluated"
    churn = results["source_churn"]
    assert [s["step"] for s in churn["steps"]] == ["before", "wave a", "silence after wave a", "wave b",
                                                   "silence after wave b"]
    assert churn["steps"][1]["sources"] == churn["cameras"] and churn["steps"][2]["sources"] == 0
    several_cores = len(os.sched_getaffinity(0)) > 1
    if several_cores:  # the comparison again on one core, in the report as section 8
        assert isinstance(results.get("fewer_cores"), list), f"fewer cores failed: {results.get('fewer_cores')}"
        one = results["fewer_cores"][0]
        assert one["cores"] == 1 and one["limit"]["fps"] > 0
        assert one["appliance"]["fps"] > 0 and one["naive"]["fps"] > 0

    cheap = results["cheap"]
    assert cheap["model"]["name"] == "bench-cheap" and all(row["fps"] > 0 for row in cheap["appliance"])
    assert [row["streams"] for row in cheap["limit"]] == [row["streams"] for row in cheap["appliance"]]
    designs = results["designs"]
    assert set(designs) == {"default", "narrow", "pool", "wide"}
    assert all(row["fps"] > 0 for d in designs.values() for row in d["rows"]), f"a design served nothing: {designs}"
    if several_cores:  # each design really ran the worker layout it names
        layout = {key: (d["executors"], d["threads"], d["alone_threads"]) for key, d in designs.items()}
        cores = len(os.sched_getaffinity(0))
        assert layout == {"default": (cores, 1, cores), "narrow": (cores, 1, 0), "pool": (cores, cores, 0),
                          "wide": (1, cores, 0)}
    target_names = [t["target"] for t in results["targets"]]
    assert any("limit(k) at every stream count" in t for t in target_names)
    assert any("naive at every stream count" in t for t in target_names)

    report = (tmp_path / "BENCHMARKS.md").read_text()
    if several_cores:
        assert "## 8. The same comparison on fewer cores" in report
    for heading in ("## Conditions", "## Targets", "## 1. The limit", "## 2. The appliance end to end",
                    "## Latency at 70 % load", "## 4. Overload", "## 5. Idle footprint", "## 6. Hot swap",
                    "## 7. Memory per extra model", "## 9. Memory as cameras come and go",
                    "## 10. A cheap model", "## 11. Worker designs side by side"):
        assert heading in report, f"BENCHMARKS.md has no {heading!r}"
    for plot in ("throughput.png", "latency.png", "overload.png"):
        png = tmp_path / "bench" / plot
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{plot} missing or not a PNG"
        assert f"bench/{plot}" in report, f"BENCHMARKS.md does not show {plot}"
