"""Scan ids and input names as they may leave the driver.

File and folder names are often accession numbers, MRNs or patient names. With
`privacy.pseudonymize_ids` every scan id becomes a keyed hash (HMAC-SHA256 with a key from the
driver's environment, so the same key gives the same ids on a resume), and every input is named
by that hash (or a hash of its path) in rows, commit records, the manifest, reasons and logs. The
map back is written to one separate file (`privacy.id_map`), which the user can keep elsewhere.

The key is checked, not only its length: the output holds its check value (key-check.json, an
HMAC of a constant under the key, which tells nothing of the key), and an ingest or purge with
another key stops in one line. Another key would give every scan a second pseudonym: every input
written again beside its first copy, and purged scans (recorded by pseudonym) back in the shards.

Content hashes (the rows' `content_hash`, which commit records and purged.json repeat) are keyed
too: a plain sha256 of the source files would let whoever holds the PACS files link a row to its
file, and so to its original id, without the key. The shard writers hash with a key derived from
the pseudonymisation key (`Names.content_key`), so the key itself never leaves the driver.

Group keys (ingest's `groups:`: a patient or study) are hashed with the same key, `g` + hash, and
are not in the id map: a DICOM group is a PatientID or StudyInstanceUID, which the map would then
hold in a new place, and a pattern's group is part of a source id the map already holds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable

from ctray.config import StorageConfig
from ctray.errors import ConfigError
from ctray.ingest.config import IngestConfig
from ctray.ingest.llm import Secret
from ctray.ingest.schema import KEYED_HASH_PREFIX
from ctray.storage import filesystem, join, publish_bytes, read_bytes

log = logging.getLogger(__name__)

KEY_CHECK = "key-check.json"
MAP_WAIT_S = 300.0
"""How long an id map update waits for another ingest's update to finish."""


class Names:
    """Scan id and input label for each original id / input URI."""

    def __init__(self, cfg: IngestConfig) -> None:
        self.cfg = cfg
        self.pseudonymize = cfg.privacy.pseudonymize_ids
        self._key = b""
        if self.pseudonymize:
            key = os.environ.get(cfg.privacy.id_key_env, "")
            if len(key) < 16:
                raise ConfigError(
                    f"privacy.pseudonymize_ids needs a key of at least 16 characters in ${cfg.privacy.id_key_env} "
                    "(keep it: the same key gives the same ids when the ingest resumes)"
                )
            self._key = key.encode()
        self.mapping: dict[str, dict] = {}

    def key_check(self) -> str:
        """The key's check value: an HMAC of a constant, the same for the same key."""
        return self._hash("ctray key check value", 16)

    def content_key(self) -> Secret:
        """The key of the content hashes (hex; None: plain sha256, ids are not pseudonymised): an
        HMAC of a constant under the id key, which the writer tasks get instead of the id key."""
        if not self.pseudonymize:
            return Secret(None)
        return Secret(hmac.new(self._key, b"ctray content hash", hashlib.sha256).hexdigest())

    def _hash(self, text: str, n: int = 24) -> str:
        return hmac.new(self._key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:n]

    def scan_id(self, source_id: str, uri: str) -> str:
        """The id stored for a scan: the original, or `s` + its keyed hash."""
        if not self.pseudonymize:
            return source_id
        sid = "s" + self._hash(source_id)
        self.mapping[sid] = {"id": sid, "source_id": source_id, "input": uri}
        return sid

    def group(self, key: str) -> str:
        """The stored group of the scans sharing `key` (a pattern's capture, a PatientID or a
        StudyInstanceUID): the key, or `g` + its keyed hash (kept out of the id map)."""
        if not self.pseudonymize:
            return key
        return "g" + self._hash("group\0" + key)

    def label(self, uri: str, scan_id: str | None = None) -> str:
        """How an input is named in reasons, logs and the manifest: its URI, or (pseudonymised) its
        scan id, or for inputs that are not scans a hash of the URI."""
        if not self.pseudonymize:
            return uri
        if scan_id is not None:
            return f"scan {scan_id}"
        name = "input-" + self._hash(uri, 16)
        self.mapping.setdefault(name, {"id": name, "source_id": None, "input": uri})
        return name

    def map_uri(self) -> str:
        return id_map_uri(self.cfg)

    def write_map(self) -> str | None:
        """Merge this run's entries into the id map file (earlier runs' entries are kept)."""
        if not self.pseudonymize:
            return None
        return update_id_map(self.cfg, lambda entries: {**entries, **self.mapping})


def content_hash(digest: bytes, key: Secret) -> str:
    """A scan's stored content hash from the sha256 `digest` of its source bytes: the hex digest,
    or under `key` (Names.content_key) "hmac-sha256:" + the HMAC-SHA256 of the digest."""
    if key.value is None:
        return digest.hex()
    return KEYED_HASH_PREFIX + hmac.new(bytes.fromhex(key.value), digest, hashlib.sha256).hexdigest()


def check_key(names: Names, uri: str, storage: StorageConfig, committed: bool) -> None:
    """With pseudonymised ids: a ConfigError of one line when the output at `uri` was pseudonymised
    with another key; the key's check value recorded there the first time. An output written before
    check values existed (`committed` scans, no key-check.json) is checked against an entry of its
    id map where the map can be read."""
    if not names.pseudonymize:
        return
    fs, root = filesystem(uri, storage)
    path = join(root, KEY_CHECK)
    mine = names.key_check()
    env = names.cfg.privacy.id_key_env
    try:
        stored = json.loads(read_bytes(fs, path, storage))["key_check"]
    except FileNotFoundError:
        stored = None
    if stored is None and committed:
        scans = [e for e in read_id_map(names.cfg).values() if e.get("source_id") is not None]
        if scans and "s" + names._hash(scans[0]["source_id"]) != scans[0]["id"]:
            stored = "(its id map)"
        elif not scans:
            log.warning("%s has no key check and no readable id map: the key in $%s is taken as its key", uri, env)
    if stored is not None and stored != mine:
        raise ConfigError(
            f"${env} is not the key {uri} was pseudonymised with (check value {stored[:6]}.., this key's "
            f"{mine[:6]}..): use that key, or ingest into a new output.uri; another key would write every scan again "
            "under a second pseudonym and bring purged scans back"
        )
    if stored is None:
        publish_bytes(json.dumps({"key_check": mine, "of": "HMAC-SHA256 of a constant"}).encode(), fs, path, storage)


def id_map_uri(cfg: IngestConfig) -> str:
    return cfg.privacy.id_map or cfg.output.uri.rstrip("/") + ".id_map.jsonl"


def read_id_map(cfg: IngestConfig) -> dict[str, dict]:
    """Pseudonym -> its entry; empty when there is no map yet."""
    fs, path = filesystem(id_map_uri(cfg), cfg.storage)
    try:
        lines = [line for line in read_bytes(fs, path, cfg.storage).decode().split("\n") if line.strip()]
    except FileNotFoundError:
        return {}
    return {(e := json.loads(line))["id"]: e for line in lines}


def write_id_map(cfg: IngestConfig, entries: dict[str, dict]) -> str:
    """The id map as `entries`, readable by its owner alone where it is a local file."""
    uri = id_map_uri(cfg)
    fs, path = filesystem(uri, cfg.storage)
    body = "".join(json.dumps(e, sort_keys=True) + "\n" for _, e in sorted(entries.items()))
    publish_bytes(body.encode(), fs, path, cfg.storage, owner_only=True)
    return uri


def update_id_map(cfg: IngestConfig, change: Callable[[dict[str, dict]], dict[str, dict]]) -> str:
    """Read, change and write the id map under a lease of its own (<map>.lock): outputs may share
    one map (privacy.id_map), and two ingests merging at once would each drop the other's entries.
    Waits while another holds it (up to `MAP_WAIT_S`)."""
    from ctray.ingest.lease import Lease, LeaseHeld

    deadline = time.time() + MAP_WAIT_S
    while True:
        try:
            with Lease(id_map_uri(cfg) + ".lock", cfg.lease, cfg.storage, what="id map update"):
                return write_id_map(cfg, change(read_id_map(cfg)))
        except LeaseHeld:
            if time.time() > deadline:
                raise
            time.sleep(1.0)
