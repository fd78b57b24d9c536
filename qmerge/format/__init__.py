"""The on-disk pack (shared/DESIGN.md, "The pack") and the checkpoints qmerge reads.

safetensors_io  read (memory-mapped) and write (streamed, hashed) safetensors; no pickle
checkpoint      a base or fine-tuned model's tensors, from a file or a Hugging Face directory
fingerprint     what a pack records about its base, and the comparison that names a mismatch
manifest        manifest.json: schema, validation, format_version
pack            reading a pack lazily
writer          the only writer of a pack: staged, locked transactions; fragments from workers
atomic          atomic file and directory replacement
"""

from qmerge.format.checkpoint import Checkpoint
from qmerge.format.fingerprint import checkpoint_fingerprint, compare, fingerprint
from qmerge.format.manifest import FORMAT_VERSION
from qmerge.format.pack import Pack, part_key
from qmerge.format.safetensors_io import SafetensorsFile, write_safetensors

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "Pack",
    "SafetensorsFile",
    "checkpoint_fingerprint",
    "compare",
    "fingerprint",
    "part_key",
    "write_safetensors",
]
