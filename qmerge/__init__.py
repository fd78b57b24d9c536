"""qmerge: one base model, many fine-tunes stored as 1-bit or low-rank task vectors, rebuilt or
applied on the fly by fused kernels. Architecture: shared/DESIGN.md.

The front door: the model-level verbs (qmerge/verbs/), for scripts.

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
    qmerge.shared_deltas(pack, "ties")                 a merge's shared delta in memory
"""

from qmerge import ops
from qmerge.codecs.policy import Policy
from qmerge.errors import QmergeError
from qmerge.verbs.compress import Options, add_task, compress, remove_task
from qmerge.verbs.export import export
from qmerge.verbs.load import fit_router, load, unload
from qmerge.verbs.merge import merge_pack, shared_deltas
from qmerge.verbs.packs import inspect, open_pack, residual, verify
from qmerge.version import __version__

__all__ = [
    "Options",
    "Policy",
    "QmergeError",
    "__version__",
    "add_task",
    "compress",
    "export",
    "fit_router",
    "inspect",
    "load",
    "merge_pack",
    "open_pack",
    "ops",
    "remove_task",
    "residual",
    "shared_deltas",
    "unload",
    "verify",
]
