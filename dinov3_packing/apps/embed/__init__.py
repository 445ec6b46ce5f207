"""`embed`: images (folders, lists, globs, tar shards, parquet) -> DINOv3 features on disk, resumable, on one
or many processes.

`job.py` runs the job (decoding, packing, forwards); `writer.py` commits shards from a thread; `progress.py`
times the stages and names the bound; `store.py` owns the output folder (lock, shards, manifests, their
checks) and reads it back (`EmbedReader`).
"""

from .job import EmbedSummary, embed
from .store import EmbedReader, read_manifest

__all__ = ["EmbedReader", "EmbedSummary", "embed", "read_manifest"]
