"""qmerge's model-level verbs (shared/DESIGN.md, "Layers"): what the CLI calls, for scripts.

    qmerge.compress(base, {"math": dir, ...}, out)    fine-tunes -> a pack
    qmerge.add_task(pack, base, {"code": dir})         one more task, others untouched
    qmerge.remove_task(pack, ["math"])
    qmerge.open_pack(pack, base=None)                  lazy reading; refuses a foreign base
    qmerge.verify(pack, base=None)                     checksums, residuals, fingerprint
    qmerge.inspect(pack)                               bytes, bits/param, worst SQNR
    qmerge.load(base, pack)                            patch a model: model(..., task="math")
    qmerge.unload(model)                               the original modules back, bit for bit
    qmerge.fit_router(model, {"math": texts}, encode=tok)   a router saved into the pack
    qmerge.export(pack, base, out, fmt="hf", task="math")   a standalone model, checked
    qmerge.merge_pack(pack, out, "ties:density=0.2")   shared delta (+ exclusive parts) as a pack
"""

from qmerge.codecs.policy import Policy
from qmerge.compressor import Options, add_task, compress, remove_task
from qmerge.export import export
from qmerge.loader import fit_router, load, unload
from qmerge.merge import merge_pack
from qmerge.packs import inspect, open_pack, residual, verify

__all__ = ["Options", "Policy", "add_task", "compress", "export", "fit_router", "inspect", "load",
           "merge_pack", "open_pack", "remove_task", "residual", "unload", "verify"]
