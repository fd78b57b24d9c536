"""The quality benchmark: `python -m bench.quality.run` (see run.py)."""
