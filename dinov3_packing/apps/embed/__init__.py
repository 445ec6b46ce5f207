"""`embed`: folders of image files -> DINOv3 features on disk, resumable, on one or many processes.

`job.py` runs the job (decoding, packing, forwards); `store.py` owns the output folder (lock, shards,
manifests, their checks) and reads it back (`EmbedReader`).
"""

from .job import EmbedSummary, embed
from .store import EmbedReader, read_manifest

__all__ = ["EmbedReader", "EmbedSummary", "embed", "read_manifest"]
