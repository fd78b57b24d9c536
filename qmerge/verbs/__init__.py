"""The model-level verbs (shared/DESIGN.md, "Layers"): what the CLI, the server and scripts call.

    compress.py      compress / add_task / remove_task: fine-tunes -> a pack
    tensors.py       one fine-tune against its base, tensor by tensor (the compressor's inner loop)
    packs.py         open_pack, residual, verify, inspect: reading a pack at the model level
    load.py          load / unload / fit_router: a model patched with a pack
    router_store.py  a router saved into (and read from) a pack
    run.py           text in, answers out: batching mixed requests for `run` and `serve`
    merge.py         merge_pack / shared_deltas: a pack's tasks through a merge method
    export/          a task or mixture as an artifact other runtimes load, checked
    demo.py          `qmerge demo`
    progress.py      progress bars

Every verb changes a pack only through qmerge.format.writer. The front door that re-exports
the verbs is `qmerge` itself (qmerge/__init__.py); this package exports its modules.
"""
