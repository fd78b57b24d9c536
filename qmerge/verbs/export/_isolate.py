"""Imported first by the check's child scripts (`_child.py`, `_child_llama.py`), which run as
plain scripts in a fresh process: from here on `import qmerge` fails (an export must run
without it), and this directory leaves sys.path (its modules, e.g. `gguf.py`, must not shadow
the packages of the same name)."""

import importlib.abc
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


class _NoQmerge(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "qmerge" or name.startswith("qmerge."):
            raise ImportError(f"{name} is blocked: an export must run without qmerge")
        return None


sys.meta_path.insert(0, _NoQmerge())
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]
