"""The shard format shared by ingest (writer) and the training data pipeline (reader).

One Parquet row per scan, one row group per row (so readers stream scan by scan); the volume and
label map in their own codec (`writer_options`), the rest zstd.
Bump SCHEMA_VERSION on any incompatible change; readers check it against manifest.json.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 4
SCHEMA_CHANGES = {
    2: "report_cache_key and stamp; source may be null (privacy settings)",
    3: "the group column",
    4: "content_hash keyed when pseudonymising; SeriesInstanceUIDs never in ids when pseudonymising",
}
"""What each version changed, for the message refusing an older shard set."""
KEYED_HASH_PREFIX = "hmac-sha256:"
"""How a keyed content_hash begins (privacy.pseudonymize_ids): HMAC-SHA256 of the source digest
under a key derived from the pseudonymisation key; without the prefix, the plain sha256."""

_BOX = pa.struct([("anatomy", pa.string()), ("box", pa.list_(pa.int32())), ("voxels", pa.int64())])
_TEXT = pa.struct([("anatomy", pa.string()), ("sentences", pa.list_(pa.string()))])
_LABEL = pa.struct([("name", pa.string()), ("value", pa.int8())])

SHARD_SCHEMA = pa.schema(
    [
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("group", pa.string(), nullable=False),  # patient/study key (ingest's groups:); default the scan_id
        pa.field("volume", pa.large_binary(), nullable=False),  # int16 HU, C order (z, y, x)
        pa.field("shape", pa.list_(pa.int32()), nullable=False),  # [z, y, x]
        pa.field("spacing", pa.list_(pa.float32()), nullable=False),  # mm along z, y, x
        pa.field("orientation", pa.string(), nullable=False),  # axis codes, e.g. SPL
        pa.field("affine", pa.list_(pa.float64()), nullable=False),  # 4x4 voxel -> RAS, row-major
        pa.field("label_map", pa.large_binary()),  # uint8 TotalSegmentator ids, same grid; null: no mask
        pa.field("anatomy_boxes", pa.list_(_BOX)),  # [z0, y0, x0, z1, y1, x1), half-open voxels
        pa.field("anatomy_texts", pa.list_(_TEXT)),  # finding sentences per anatomy
        pa.field("report_text", pa.string()),  # the whole report; null unless privacy.keep_report_text
        pa.field("report_parser", pa.string()),  # "rules", "llm:<model>", "rules (llm failed: <category>)"
        pa.field("report_cache_key", pa.string()),  # the report's LLM cache entry (for `ctray purge`)
        pa.field("labels", pa.list_(_LABEL)),  # 0/1 finding labels from the reports / labels table
        pa.field(
            "source", pa.string()
        ),  # URI of the scan (file or series folder); null unless privacy.keep_source_paths
        pa.field("mask_source", pa.string()),
        # sha256 of the source bytes (hex); pseudonymised: "hmac-sha256:" + HMAC under the pseudonymisation key
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("stamp", pa.string(), nullable=False),  # listing stamp of the inputs: a changed one is re-ingested
    ],
    metadata={"ctray.schema_version": str(SCHEMA_VERSION)},
)


def volume_of(row: dict) -> np.ndarray:
    """The int16 HU volume of a shard row, as a read-only (z, y, x) array (no copy)."""
    return np.frombuffer(row["volume"], dtype=np.int16).reshape(tuple(row["shape"]))


def label_map_of(row: dict) -> np.ndarray | None:
    """The uint8 label map of a shard row, or None when the scan had no mask."""
    if row.get("label_map") is None:
        return None
    return np.frombuffer(row["label_map"], dtype=np.uint8).reshape(tuple(row["shape"]))


BULK_COLUMNS = ("volume", "label_map")
"""The columns that are nearly all of a shard's bytes, and of a reader's CPU when compressed."""
BulkCodec = Literal["lz4", "zstd", "none"]


@functools.cache
def _leaf_paths() -> tuple[str, ...]:
    """The schema's Parquet leaf columns ("anatomy_boxes.list.element.box.list.element", ...):
    per-column codecs are set per leaf, and a leaf left out is written uncompressed."""
    sink = pa.BufferOutputStream()
    pq.write_table(SHARD_SCHEMA.empty_table(), sink)
    schema = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return tuple(schema.column(i).path for i in range(len(schema)))


def writer_options(bulk_codec: BulkCodec = "lz4", level: int = 3) -> dict[str, Any]:
    """ParquetWriter keywords for shards: the volume and label map in `bulk_codec`, every other
    column zstd at `level` (small, and read once per scan). Any codec reads back alike."""
    codecs = {path: bulk_codec if path in BULK_COLUMNS else "zstd" for path in _leaf_paths()}
    levels = {path: level for path, codec in codecs.items() if codec == "zstd"}
    return {"compression": codecs, "compression_level": levels, "use_dictionary": False}
