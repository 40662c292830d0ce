"""Benchmarks: the appliance against raw ONNX Runtime and a hand-written baseline, in one run.

``python -m bench.run [--quick] [--out docs]`` writes ``BENCHMARKS.md`` and ``bench/results.json`` (plus
PNG plots) under the output folder. See ``docs/BENCHMARKS.md`` for what each section measures.
"""
