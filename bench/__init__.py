"""qmerge's benchmarks, run as modules from the repository root (`python -m bench.kernels`);
each writes the results file named in its docstring, with its command at the top. Shared
timing lives in _timing.py, shared models and data in common.py."""
