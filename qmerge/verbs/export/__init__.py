"""Export: a task (or mixture) of a pack as an artifact other runtimes load, checked against
the routed model (shared/DESIGN.md, "Export").

    hf      a Hugging Face model directory (transformers loads it as-is)     hf.py
    peft    a PEFT LoRA adapter over the base                                 adapter.py
    int8    int8 per-channel weights + a small standalone loader              int8.py
    onnx    the merged model for onnxruntime                                  to_onnx.py
    gguf    the merged causal LM for llama.cpp                                gguf.py
    gguf-lora  the task as a llama.cpp LoRA adapter over the base GGUF        gguf.py
            (gguf_arch.py: names, hyperparameters, types; gguf_vocab.py: the tokenizer)

build.py drives one export; check.py compares the artifact (run by _child.py, or by
_child_llama.py in llama.cpp, in a fresh process without qmerge) with the routed model.
`peft` with runtime="vllm" writes only what vLLM loads (adapter.py).
"""

from qmerge.verbs.export.build import FORMATS, export

__all__ = ["FORMATS", "export"]
