"""The sampler contract (`Sampler`) and what the recipes' CPU samplers share (each recipe's own
sampler is in its folder): zero-copy volumes and small columns from a pyarrow batch, windowing,
and the per-anatomy text side of TotalFM stage 2 and CA-GCL.

Only numpy, the shard schema and the Rust tokenizers here: every Ray Data task process unpickles
its sampler, and a sampler that imported torch or MONAI would cost each new process seconds before
its first scan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from ctray.data.text import TextEncoding


@runtime_checkable
class Sampler(Protocol):
    """A Ray Data map_batches UDF: shard rows (a pyarrow batch, or a dict of columns in tests) ->
    dict of numpy arrays with a leading scan axis. Imports numpy only: every Ray Data task
    process unpickles it, and torch would cost each new process seconds before its first scan."""

    @property
    def columns(self) -> tuple[str, ...]:
        """The shard columns it reads (the rest are never fetched)."""
        ...

    def __call__(self, batch: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Every random draw comes from `rng` (seeded by the run's seed and the draw)."""
        ...


Bulk = Mapping[str, tuple[tuple[int, ...], Any]]
"""A sampler's big per-scan arrays: name -> (shape of one scan's array, dtype)."""


def output_bytes(bulk: Bulk) -> int:
    """Bytes of one scan's `bulk` arrays: a sampler's `draw_bytes`, the size of its output for one
    scan, which sizes the Ray Data tasks that run it (ctray.data.pipeline.block_draws)."""
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in bulk.values())


@runtime_checkable
class WritesInto(Sampler, Protocol):
    """A sampler that writes its big arrays (`bulk`) into arrays it is handed: the rows of the
    block a Ray Data task returns (ctray.data.pipeline.ShardRowReader), so that no draw's arrays
    are copied again into the block, nor newly allocated memory first touched (measured on
    CA-GCL's 30 MB draws: gathering them cost as much CPU as sampling them)."""

    bulk: Bulk

    def __call__(
        self, batch: Any, rng: np.random.Generator, out: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """With `out` (for each name of `bulk`, an array of shape (rows, *shape)), its arrays are
        written there and returned as they are; without, allocated."""
        ...


@runtime_checkable
class ReadsBeside(Sampler, Protocol):
    """A sampler that also reads columns from a file beside each shard, row group for row group
    (a cache cut from the shard: TotalFM's organ volumes)."""

    side_columns: tuple[str, ...]

    def side_file(self, shard: str) -> str | None:
        """The file beside the shard at path `shard` (the same filesystem), or None: read the shard only."""
        ...


def binary_column(batch: Any, column: str, dtype: type) -> list[np.ndarray | None]:
    """The values of a binary or large_binary column of a pyarrow batch as flat arrays of `dtype`
    (None where null), read straight from the Arrow data buffer: the numpy batch format,
    `to_pylist` and even a value's scalar (`column[i].as_buffer()`: 1 ms per 10 MB value) first
    copy it, which costs more than sampling from it. A dict of columns (tests) works too."""
    if isinstance(batch, dict):
        return [None if v is None else np.frombuffer(v, dtype=dtype) for v in batch[column]]
    import pyarrow as pa

    col = batch.column(column)
    # A row group read whole is one chunk: combine_chunks would copy it all the same
    col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    width = np.int64 if pa.types.is_large_binary(col.type) else np.int32
    offsets = np.frombuffer(col.buffers()[1], dtype=width)[col.offset : col.offset + len(col) + 1]
    data, valid = col.buffers()[2], col.is_valid().to_numpy(zero_copy_only=False)
    size = np.dtype(dtype).itemsize
    return [
        np.frombuffer(data, dtype, int(offsets[i + 1] - offsets[i]) // size, int(offsets[i])) if valid[i] else None
        for i in range(len(col))
    ]


def _binary_arrays(batch: Any, column: str, dtype: type) -> list[np.ndarray | None]:
    """binary_column's arrays shaped by the batch's `shape` column (a scan's volume or label map)."""
    shapes = batch["shape"] if isinstance(batch, dict) else batch.column("shape").to_pylist()
    return [
        None if v is None else v.reshape(tuple(s))
        for v, s in zip(binary_column(batch, column, dtype), shapes, strict=False)
    ]


def volumes(batch: Any) -> list[np.ndarray]:
    """The int16 HU volumes of a batch of shard rows, without copying them (`_binary_arrays`)."""
    return [v for v in _binary_arrays(batch, "volume", np.int16) if v is not None]


def label_maps(batch: Any) -> list[np.ndarray | None]:
    """The uint8 label maps of a batch of shard rows (None: the scan had no mask), without copying them."""
    return _binary_arrays(batch, "label_map", np.uint8)


def window01(vol: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """HU -> [0, 1] (clipped) as float16: the model input, half the bytes of float32 in transit."""
    out = (np.clip(vol, lo, hi, dtype=np.float32) - lo) / (hi - lo)
    return out.astype(np.float16)


class AnatomyTexts:
    """The per-anatomy text side shared by TotalFM stage 2 and CA-GCL, for one batch of rows.

    For anatomy j of scan i: a text drawn from its report sentences by `policy` ("one": TotalFM's
    one finding sentence per organ per step; "clinical_aware": CA-GCL's random non-empty shuffled
    subset), tokenised; the text's hash (soft targets); whether the anatomy is abnormal according to
    the finding labels mapped to it (1, 0, or -1 when no label is known); and every finding label
    (-1 unknown), for zero-shot evaluation.
    """

    columns = ("anatomy_texts", "labels")

    def __init__(self, anatomies: list[str], findings: dict[str, str], encoding: TextEncoding, policy: str):
        from ctray.data import text

        self.anatomies = list(anatomies)
        self.findings = dict(findings)
        self.encoding = encoding
        self.pick = {"one": text.one_sentence, "clinical_aware": text.clinical_aware, "all": text.all_sentences}[policy]
        self.hash = text.text_hash

    def __call__(
        self, rows: list[dict[str, Any]], region: np.ndarray, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """`region` (S, A) bool: the anatomy is in the image. Pairs need both image and text."""
        s, a = len(rows), len(self.anatomies)
        present = np.zeros((s, a), dtype=np.uint8)
        hashes = np.zeros((s, a), dtype=np.int64)
        abnormal = np.full((s, a), -1, dtype=np.int8)
        labels = np.full((s, len(self.findings)), -1, dtype=np.int8)
        texts, slots = [], []
        for i, row in enumerate(rows):
            known = {lab["name"]: lab["value"] for lab in row.get("labels") or []}
            for f, name in enumerate(self.findings):
                if name in known:
                    labels[i, f] = known[name]
            sentences = {t["anatomy"]: t["sentences"] for t in row.get("anatomy_texts") or []}
            for j, anatomy in enumerate(self.anatomies):
                mapped = [known[f] for f, an in self.findings.items() if an == anatomy and f in known]
                if mapped:
                    abnormal[i, j] = int(any(mapped))
                if region[i, j] and sentences.get(anatomy):
                    t = self.pick(list(sentences[anatomy]), rng)
                    texts.append(t)
                    slots.append((i, j))
                    hashes[i, j] = self.hash(t)
                    present[i, j] = 1
        ids = np.zeros((s, a, self.encoding.max_length), dtype=np.int32)
        mask = np.zeros((s, a, self.encoding.max_length), dtype=np.uint8)
        enc_ids, enc_mask = self.encoding.encode(texts)
        for k, (i, j) in enumerate(slots):
            ids[i, j], mask[i, j] = enc_ids[k], enc_mask[k]
        return {
            "text_ids": ids,
            "text_mask": mask,
            "text_hash": hashes,
            "present": present,
            "abnormal": abnormal,
            "finding_labels": labels,
        }


def small_columns(batch: Any, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of a batch as dicts of its small columns (the volume and label map stay in Arrow)."""
    names = [c for c in columns if c not in ("volume", "label_map")]
    if isinstance(batch, dict):
        return [{k: batch[k][i] for k in names} for i in range(len(batch["shape"]))]
    return batch.select(names).to_pylist()
