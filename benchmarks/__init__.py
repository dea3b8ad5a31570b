"""Speed and memory benchmarks (bench-A against TRL, scaling); never run as tests.

Regenerate ``docs/benchmarks.md`` and ``docs/benchmarks.json`` with ``python -m benchmarks.bench_a``.
"""
