"""Ingest from and to a real S3 API over HTTP (moto server on 127.0.0.1) through s3fs."""

import json
import socket
import threading
import time

import pyarrow.parquet as pq
import pytest
import s3fs

from ctray.errors import StorageError
from ctray.ingest.job import run_ingest

from conftest import free_port, ingest_cfg


def test_phantoms_from_and_to_s3(ray_local, phantom_dir, s3_endpoint):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("ct-in")
    fs.mkdir("ct-out")
    fs.put(str(phantom_dir) + "/", "ct-in/phantoms/", recursive=True)
    cfg = ingest_cfg(
        "s3://ct-in/phantoms/scans", "s3://ct-out/run1",
        f"storage.endpoint_url={s3_endpoint}", "storage.retries=2",
        masks="s3://ct-in/phantoms/masks", reports="s3://ct-in/phantoms/reports.jsonl",
    )
    result = run_ingest(cfg)
    assert (result.scans, result.quarantined) == (6, 0)
    assert result.manifest_uri == "s3://ct-out/run1/manifest.json"
    fs.invalidate_cache()
    manifest = json.loads(fs.cat_file("ct-out/run1/manifest.json"))
    rows = []
    for shard in manifest["shards"]:
        with fs.open(f"ct-out/run1/{shard['path']}", "rb") as f:
            rows += pq.read_table(f).to_pylist()
    assert sorted(r["scan_id"] for r in rows) == [f"phantom{i:04d}" for i in range(6)]
    assert all(r["source"].startswith("s3://ct-in/phantoms/scans/") for r in rows)
    assert all(r["label_map"] is not None and r["anatomy_texts"] for r in rows)
    # resume against S3 too
    assert run_ingest(cfg).scans == 6


def test_storage_down_is_a_clear_error(ray_local, phantom_dir):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    cfg = ingest_cfg(phantom_dir / "scans", "s3://ct-out/down", f"storage.endpoint_url={dead}",
                     "storage.retries=3", "storage.backoff_s=0.1", "storage.connect_timeout_s=1")
    t0 = time.time()
    with pytest.raises(StorageError) as err:
        run_ingest(cfg)
    assert "s3://ct-out/down" in str(err.value) and "after 3 attempts" in str(err.value)
    assert "\n" not in str(err.value) and "testing" not in str(err.value)  # one line, no credentials
    assert time.time() - t0 < 60


class _Switch:
    """A TCP relay on 127.0.0.1 in front of the moto server that can be cut (storage going down
    mid-job) while the server keeps its data."""

    def __init__(self, target_port: int):
        self.port = free_port()
        self.up = True
        self.target = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass


def test_storage_going_down_keeps_committed_shards(ray_local, phantom_dir, s3_endpoint):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("ct-flaky")
    relay = _Switch(int(s3_endpoint.rsplit(":", 1)[1]))
    endpoint = f"http://127.0.0.1:{relay.port}"
    cfg = ingest_cfg(phantom_dir / "scans", "s3://ct-flaky/run", f"storage.endpoint_url={endpoint}",
                     "storage.retries=2", "storage.backoff_s=0.1", "storage.connect_timeout_s=1",
                     "output.scans_per_shard=3", "concurrency=1")
    first = run_ingest(cfg.model_copy(update={"input": cfg.input.model_copy(update={"scans": str(phantom_dir / "scans"), "masks": None})}))
    assert first.scans == 6
    fs.invalidate_cache()
    before = {p: fs.info(p)["ETag"] for p in fs.find("ct-flaky/run/shards")}
    assert len(before) == 2
    relay.up = False
    with pytest.raises(StorageError):
        run_ingest(cfg)
    relay.up = True
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.find("ct-flaky/run/shards")} == before
    assert run_ingest(cfg).scans == 6
