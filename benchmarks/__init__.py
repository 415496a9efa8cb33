"""Benchmarks for stream-guard (not collected by pytest).

``python -m benchmarks.e2e`` (``make bench``) runs the end-to-end benchmark: the bare Triton
ceiling, a naive one-at-a-time consumer and the stream-guard worker side by side on one local
stack, and appends the results to ``benchmarks/RESULTS.md``. See ``benchmarks/README.md``.
"""
