"""Export: a task (or mixture) of a pack as an artifact other runtimes load, checked against
the routed model (shared/DESIGN.md, "Export").

    hf      a Hugging Face model directory (transformers loads it as-is)     hf.py
    peft    a PEFT LoRA adapter over the base                                 adapter.py
    int8    int8 per-channel weights + a small standalone loader              int8.py
    onnx    the merged model for onnxruntime                                  to_onnx.py

build.py drives one export; check.py compares the artifact (run by _child.py in a fresh
process without qmerge) with the routed model.
"""

from qmerge.verbs.export.build import FORMATS, export

__all__ = ["FORMATS", "export"]
