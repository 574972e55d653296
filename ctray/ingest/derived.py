"""What is made from a shard set's scans, recorded in the shard set so that `ctray purge` reaches it.

`ctray embed` (an embeddings folder), `ctray eval` (a report folder) and a run that trains its
tokenizer on the shards' reports each record themselves under `_derived/` of the shard set: one
small file per output (`<kind>-<hash of its URI>.json`: kind, URI, the shards it read), so two
writers never touch one file and no lease is needed. A purge then rewrites the embeddings parts
without the purged scans, deletes or keeps evaluation folders as told (their figures were computed
with the scans) and names the runs whose tokenizer saw them.

A shard set its user may read but not write (a training role without write access) cannot hold
the record: the command warns that a purge will not find its output, and goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Literal

from ctray.config import StorageConfig
from ctray.errors import StorageError
from ctray.redact import redact_text
from ctray.storage import filesystem, join, list_files, publish_bytes, read_many, remove

log = logging.getLogger(__name__)

DERIVED_DIR = "_derived"
SHARED_TOKENIZERS = "_tokenizers"
"""Folder of a shard set holding the tokenizers trained on its reports, one per settings
(ctray.data.text.shard_set_tokenizer): a cache, dropped by a purge."""
PER_SHARD = "_per_shard"
"""Folder of a shard set holding caches cut from each shard, one file per shard named as the shard
(<kind>/<key>/<shard>.parquet: TotalFM's organ volumes): a purge removes the files of the shards it
rewrites (they hold the purged scans' pixels); a later run cuts the rewritten shard anew."""
Kind = Literal["embeddings", "evaluation", "tokenizer"]


def per_shard_folder(root: str, kind: str, key: str) -> str:
    """Where the per-shard cache `kind` made with settings `key` keeps its files (PER_SHARD)."""
    return join(root, PER_SHARD, kind, key)


def drop_per_shard(uri: str, storage: StorageConfig, shards: set[str]) -> int:
    """Remove every per-shard cache file cut from `shards`; returns how many."""
    fs, root = filesystem(uri, storage)
    files = list_files(fs, join(root, PER_SHARD), storage, ".parquet")
    gone = [p for p in files if posixpath.basename(p).removesuffix(".parquet") in shards]
    for path in gone:
        remove(fs, path, storage)
    return len(gone)


@dataclass(frozen=True)
class Derived:
    """One output made from the shard set."""

    kind: Kind
    """embeddings (a `ctray embed` folder), evaluation (a `ctray eval` report folder) or tokenizer
    (a run folder whose tokenizer.json was trained on the shards' reports)."""
    uri: str
    """The output's folder (credentials redacted)."""
    shards: tuple[str, ...]
    """Names of the shards it read (part-<id>): a purge reaches it when one of them held a purged scan."""
    at: float
    """When it was recorded (Unix time)."""

    def to_json(self) -> dict:
        return {"kind": self.kind, "uri": self.uri, "shards": list(self.shards), "at": self.at}

    @classmethod
    def from_json(cls, d: dict) -> Derived:
        return cls(d["kind"], d["uri"], tuple(d["shards"]), float(d["at"]))


def _path(root: str, kind: str, uri: str) -> str:
    return join(root, DERIVED_DIR, f"{kind}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.json")


def record_derived(shards_uri: str, storage: StorageConfig, kind: Kind, uri: str, shards: list[str]) -> None:
    """Record (or update) the output at `uri`, made from `shards` of the shard set at `shards_uri`.
    A shard set this process cannot write to is a warning, not an error."""
    uri = redact_text(uri.rstrip("/"))
    entry = Derived(kind, uri, tuple(sorted(set(shards))), time.time())
    try:
        fs, root = filesystem(shards_uri, storage)
        publish_bytes(json.dumps(entry.to_json()).encode(), fs, _path(root, kind, uri), storage)
    except (StorageError, OSError) as e:
        log.warning(
            "%s: could not record this %s output in the shard set (%s): `ctray purge` will not reach %s",
            redact_text(shards_uri),
            kind,
            type(e).__name__,
            uri,
        )


def read_derived(shards_uri: str, storage: StorageConfig) -> list[Derived]:
    """Every output recorded in the shard set at `shards_uri`, by kind then URI."""
    fs, root = filesystem(shards_uri, storage)
    paths = list_files(fs, join(root, DERIVED_DIR), storage, ".json")
    out = [Derived.from_json(json.loads(body)) for body in read_many(fs, paths, storage, missing_ok=True).values()]
    return sorted(out, key=lambda d: (d.kind, d.uri))


def forget_derived(shards_uri: str, storage: StorageConfig, derived: Derived) -> None:
    """Drop the record of an output that is gone (deleted by a purge or by its owner)."""
    fs, root = filesystem(shards_uri, storage)
    remove(fs, _path(root, derived.kind, derived.uri), storage)


def part_name(shard: str, sha256: str) -> str:
    """The embeddings part of a shard (ctray.embed): its name and the start of its content hash, so
    that a shard rewritten under the same name (another input, a purge) is embedded anew."""
    return f"part-{shard.removeprefix('part-')}-{sha256[:12]}.parquet"


def shard_of_part(part: str) -> str:
    """The shard an embeddings part was made from: part-<id>-<sha12>.parquet -> part-<id>."""
    return posixpath.basename(part).removesuffix(".parquet").rsplit("-", 1)[0]


def embedded_shards(embeddings: str, storage: StorageConfig) -> list[str]:
    """The shards whose parts are in the embeddings folder (ctray.embed.part_name)."""
    fs, root = filesystem(embeddings, storage)
    return [
        shard_of_part(p) for p in list_files(fs, root, storage, ".parquet") if posixpath.basename(p).startswith("part-")
    ]
