"""Typed config of `ctray ingest` (see jobs/ingest.yaml for a complete example)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from ctray.anatomy import DEFAULT_ANATOMIES, anatomy_label_ids
from ctray.config import RayConfig, Section, StorageConfig
from ctray.redact import redact_text


class DicomConfig(Section):
    """How DICOM series are recognised, split and checked (CT exports as hospitals make them)."""

    max_slices: int = Field(2000, ge=2)
    """Slices per series; a longer series is quarantined before any pixel data is read."""
    spacing_tolerance: float = Field(0.05, ge=0)
    """Largest accepted deviation of a slice step from the series' median step, as a fraction of
    it. A missing slice doubles one step and is quarantined with the measured steps; resampling
    over a gap would silently distort the volume."""
    max_tilt_deg: float = Field(1.0, ge=0)
    """Largest accepted angle between the slice stack direction and the slice normal (gantry
    tilt); a tilted series is quarantined with the measured angle (ctray does not de-shear)."""
    max_oblique_deg: float = Field(30.0, ge=0, le=90)
    """A series whose slice normal is further than this from the patient's head-foot axis is not
    axial (a sagittal or coronal reformat) and is skipped with that reason."""


class InputConfig(Section):
    """Where scans, masks and reports come from."""

    scans: str
    """Folder or URI holding NIfTI files (*.nii, *.nii.gz) and/or DICOM series. DICOM files are
    recognised by content (whatever their names), grouped by folder and split by
    SeriesInstanceUID. The scan id is the path below this root without extension (a NIfTI file) or
    the folder's path (a DICOM series; `<folder>/<SeriesInstanceUID>` when the folder holds several
    series). Every other file is listed in the manifest as skipped, with the reason."""
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    """DICOM series checks."""
    reports: str | None = None
    """Reports table: CSV or JSONL (optionally .gz) with a scan id column and report text column(s);
    other 0/1 columns are kept as finding labels. Ids are matched to scans by the full scan id,
    then the series' folder, then the last path part; a .nii/.nii.gz suffix in the table's ids is
    ignored. None: no reports (image-only objectives such as CT-FM)."""
    report_id_column: str = "scan_id"
    """Column (CSV) or key (JSONL) of the scan id in the reports table."""
    report_text_columns: list[str] = Field(default_factory=lambda: ["report"])
    """Column(s) or key(s) of the report text, joined in this order (CT-RATE keeps
    [Findings_EN, Impressions_EN]). A single name is accepted as well."""
    labels: str | None = None
    """A separate labels table (CSV or JSONL, optionally .gz) of 0/1 finding columns joined on
    `labels_id_column` (CT-RATE's multi_abnormality_labels.csv); its values win over 0/1 columns
    of the reports table."""
    labels_id_column: str | None = None
    """Id column of the labels table (None: report_id_column)."""
    require_report: bool = True
    """With a reports table: a scan whose report is missing, empty, not UTF-8 or longer than
    reports.max_chars is quarantined. False keeps such scans with empty anatomy texts."""
    masks: str | None = None
    """Folder or URI of TotalSegmentator v2 "total" label maps named like their scans (NIfTI)."""
    require_mask: bool = True
    """With a masks folder: a scan without a mask is quarantined. False keeps it without labels."""
    segment: bool = False
    """Run TotalSegmentator's Python API in Ray Data actors (GPU when the cluster has one) for scans
    without a mask. Needs `pip install ctray[segment]` and the task's weights installed."""
    segment_fast: bool = False
    """Use TotalSegmentator's fast (3 mm) model."""

    @field_validator("report_text_columns", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("report_text_columns")
    @classmethod
    def _not_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one report text column")
        return v


class PreprocessConfig(Section):
    """Per-scan geometry and intensity; the defaults follow CT-FM."""

    orientation: str = "SPL"
    """Target axis codes (nibabel convention: the direction each array axis increases toward).
    SPL gives arrays indexed (z, y, x) as CT-FM uses them."""
    spacing: tuple[float, float, float] = (3.0, 1.0, 1.0)
    """Target voxel size in mm along the oriented axes (z, y, x)."""
    crop_foreground: bool = True
    """Crop to the bounding box of voxels above `foreground_hu` (the body), as CT-FM's
    CropForeground; the air around the patient is not worth storing or sampling."""
    foreground_hu: float = -500.0
    """HU threshold that separates the body from the surrounding air. CT-FM's CropForeground keeps
    voxels above 0 HU; ctray keeps -500, which also keeps the subcutaneous fat (~-100 HU) at the
    body's outline inside the box. It is part of the preprocessing fingerprint: another value means
    a new output.uri (a re-ingest)."""
    min_hu_required: float = -500.0
    """A CT of a body holds air, so its minimum must be at or below this; images whose minimum is
    higher (MR, PET, already-normalised data) are quarantined as a non-CT intensity range."""
    max_hu_allowed: float = 32767.0
    """Maximum HU accepted (int16 storage); larger values mean a wrong slope or a non-CT image."""
    max_voxels: int = Field(2**29, ge=1)
    """Largest volume in voxels (default 512x1024x1024: 1 GiB as int16), of the input and of its
    resampled grid: the input's checked from the file header (or the DICOM slice count and size)
    before any voxel is read, the resampled one from the input's shape and spacing before it is
    allocated (a wrong pixdim makes a small file huge at the target spacing). A larger or a
    truncated input is quarantined instead of costing a worker its memory."""
    anatomies: dict[str, list[str]] = Field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_ANATOMIES.items()})
    """Anatomy name -> TotalSegmentator class names; boxes and report texts are keyed by these."""

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, v: str) -> str:
        v = v.upper()
        if len(v) != 3 or set(v) - set("LRAPSI"):
            raise ValueError(f"orientation {v!r} must be three axis codes from L/R, A/P, S/I")
        if len({c.translate(str.maketrans("RPI", "LAS")) for c in v}) != 3:
            raise ValueError(f"orientation {v!r} names one axis twice")
        return v

    @field_validator("spacing")
    @classmethod
    def _positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError(f"spacing {v} must be positive")
        return v

    @field_validator("anatomies")
    @classmethod
    def _known_classes(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        anatomy_label_ids(v)
        return v


class LLMConfig(Section):
    """An OpenAI-compatible chat endpoint (vLLM, Ollama, a hosted API) that splits reports.

    Report text goes to this endpoint: use one inside the hospital's network (or one covered by a
    data processing agreement). The key is read once on the driver (from `api_key_env` or
    `api_key_file`) and handed to the shard writers through Ray's object store, never through an
    environment variable, a config or a task argument that the dashboard shows."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """Endpoint root; ctray POSTs to {base_url}/chat/completions and nowhere else: a redirect is an
    error, never followed. Plain http:// is accepted only for a loopback host reached without a
    proxy unless `allow_insecure_http` is true."""
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    """Model name the endpoint serves."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable of the driver holding the API key (may be unset for local servers)."""
    api_key_file: str | None = None
    """A file on the driver's machine holding the key (a mounted Kubernetes secret); wins over
    `api_key_env`."""
    allow_insecure_http: bool = False
    """Send reports over plain http:// to a host other than this machine, or through `proxy` (a
    trusted internal network only)."""
    proxy: str | None = None
    """An HTTP proxy (http://host:port) for the endpoint's requests. None: none at all, whatever
    http_proxy, https_proxy or all_proxy say, since a proxy picked up from the environment would
    receive the key and the reports. An https:// endpoint is tunnelled through it (CONNECT),
    encrypted end to end."""
    timeout_s: float = 60.0
    """Timeout of one request."""
    retries: int = 3
    """Attempts per report (invalid JSON or schema counts as a failed attempt)."""

    @field_validator("proxy")
    @classmethod
    def _http_proxy(cls, v: str | None) -> str | None:
        if not v:
            return None
        url = urlsplit(v)
        if url.scheme != "http" or not url.hostname:
            # urllib speaks plain HTTP to any proxy (an https:// one too): saying http:// keeps
            # that visible; the endpoint's own TLS runs through the tunnel.
            raise ValueError(f"proxy {redact_text(v)} must be http://host:port")
        return v


class ReportsConfig(Section):
    """How reports become anatomy-level finding sentences."""

    parser: Literal["rules", "llm"] = "rules"
    """`rules`: offline, deterministic sentence split + anatomy lexicon. `llm`: the endpoint below,
    falling back to the rules (reason recorded per scan) when it fails."""
    llm: LLMConfig = Field(default_factory=LLMConfig)
    """Endpoint settings, used when parser is `llm`."""
    max_chars: int = Field(100_000, ge=1)
    """Longest report accepted, in characters (its text columns joined). A radiology report is a
    few thousand; one far longer is something else (a pasted document, a CSV field whose unclosed
    quote swallowed the rows after it) and would cost every parser and the LLM endpoint. Such a
    report is refused for its own scan, with its length (quarantined, or kept without anatomy texts
    under input.require_report=false); the rest of the table is read on."""

    @model_validator(mode="after")
    def _secure_endpoint(self) -> ReportsConfig:
        if self.parser == "llm":
            problem = endpoint_problem(self.llm.base_url, self.llm)
            if problem:
                raise ValueError(problem)
        return self


def endpoint_problem(url: str, llm: LLMConfig) -> str | None:
    """Why report text and the key must not go to `url` under `llm`'s settings, in one line (None:
    they may). Checked when the config is read and again for every request (ctray.ingest.llm), as a
    config can be built or changed without validation."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"reports.llm.base_url {redact_text(url)} is not an http:// or https:// URL"
    if parts.scheme == "https" or llm.allow_insecure_http:
        return None
    if not _is_loopback(parts.hostname):
        return (
            f"reports.llm.base_url {redact_text(url)} sends report text unencrypted to another host; "
            "use https:// or set reports.llm.allow_insecure_http=true for a trusted network"
        )
    if llm.proxy:
        return (
            f"reports.llm.base_url {redact_text(url)} sends report text unencrypted through reports.llm.proxy; "
            "use https://, no proxy for a loopback endpoint or reports.llm.allow_insecure_http=true"
        )
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PrivacyConfig(Section):
    """What of the patient data reaches the shards and their records. Nothing of a report or of a
    DICOM header's identifying tags ever reaches a log, an error, the manifest or commit records;
    these settings decide what the shards themselves keep (README: Patient data)."""

    pseudonymize_ids: bool = False
    """Replace scan ids (file and folder names: often accession numbers, MRNs or names) by a keyed
    hash (HMAC-SHA256 with the key in `id_key_env`) in rows, records, the manifest and logs, and key
    the rows' `content_hash` too (a plain sha256 would link a row to its PACS file without the key).
    The map back to the original ids is written to `id_map` only."""
    id_key_env: str = "CTRAY_ID_KEY"
    """Environment variable of the driver holding the pseudonymisation key. Keep the key: the same
    key gives the same ids, so a resumed or extended ingest matches its earlier rows."""
    id_map: str | None = None
    """Where the pseudonym -> original id and input map goes (JSONL; keep it apart from the shards,
    e.g. on a restricted bucket). None: `<output.uri>.id_map.jsonl`, beside the shard folder."""
    keep_report_text: bool = False
    """Store the whole report in each row. Off by default: the recipes train on the anatomy-level
    finding sentences, and the report's header lines (names, dates, physicians) stay out."""
    keep_source_paths: bool | None = None
    """Store each scan's and mask's input URI in its row. None: on unless `pseudonymize_ids`
    (paths usually hold the ids that pseudonymisation hides)."""

    @property
    def source_paths(self) -> bool:
        return (not self.pseudonymize_ids) if self.keep_source_paths is None else self.keep_source_paths


class GroupsConfig(Section):
    """Which scans belong together: one patient's scans (several reconstructions, follow-ups) must
    not sit on both sides of a train/test split. Each row's `group` column holds the key; scans
    that share it are one group. Default: every scan its own group (its scan id)."""

    pattern: str | None = None
    """A regex with one capture group, searched (re.search) in each scan's source id: the path
    below input.scans without extension (NIfTI) or the series' folder (DICOM), before
    pseudonymisation. The captured text is the group; a scan it does not match is its own group
    (counted in the manifest as `ungrouped`, never named). CT-RATE: see jobs/ingest.yaml."""
    dicom: Literal["none", "patient", "study"] = "none"
    """DICOM series: group by the PatientID (`patient`) or StudyInstanceUID (`study`) tag, read by
    the probe (that tag alone, never logged); a series without it falls back to `pattern`.
    `patient` needs privacy.pseudonymize_ids: raw patient ids are never stored."""

    @field_validator("pattern")
    @classmethod
    def _one_capture(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            groups = re.compile(v).groups
        except re.error as e:
            raise ValueError(f"{v!r} is not a regex ({e})") from None
        if groups != 1:
            raise ValueError(f"{v!r} has {groups} capture groups; it needs exactly one (the group key)")
        return v

    @property
    def dicom_tag(self) -> str | None:
        """The DICOM tag the probe reads for the group (None: none)."""
        return {"none": None, "patient": "PatientID", "study": "StudyInstanceUID"}[self.dicom]

    @property
    def configured(self) -> bool:
        """Whether any grouping is set (else every scan is its own group, and none is `ungrouped`)."""
        return self.pattern is not None or self.dicom != "none"

    def describe(self, pseudonymized: bool) -> str:
        """How the groups were formed, in words (embed.json states it)."""
        ways = [f"DICOM {self.dicom_tag}"] if self.dicom_tag else []
        ways += [f"groups.pattern '{self.pattern}' on the source id"] if self.pattern is not None else []
        if not ways:
            return "each scan its own group (its scan id)"
        hashed = ", as keyed hashes" if pseudonymized else ""
        return f"{', else '.join(ways)}{hashed}; else the scan's own id"


class LeaseConfig(Section):
    """The output's lease: one ingest writes an output at a time (also on object stores)."""

    ttl_s: float = Field(600.0, gt=0)
    """A lease not renewed for this long is stale: a later ingest takes it over (the holder
    crashed). The holder renews it every ttl_s / 4."""
    settle_s: float = Field(2.0, ge=0)
    """Wait between writing the lease and reading it back, on stores where taking it is no
    compare-and-swap (GCS, other fsspec stores): of two ingests starting at once, the later write
    wins and the other one sees it and refuses, as long as no write lands later than this. S3 keeps
    the read-back as a check on stores that ignore conditional writes; local folders skip it."""


class OutputConfig(Section):
    """Where shards and the manifest go."""

    uri: str
    """Folder or URI (s3://bucket/prefix) of the shard set."""
    scans_per_shard: int = Field(16, ge=1)
    """Scans per Parquet file; one Ray task writes one shard."""
    compression_level: int = Field(2, ge=1, le=22)
    """zstd level of the small columns, and of the volume and label map with bulk_codec "zstd".
    Measured on one core, a row at 3x1x1 mm (volume bytes / file bytes): level 1 1.71x, 2 1.95x,
    3 2.00x, alike on a real CT (the TotalSegmentator example) and on `ctray bench ingest`'s
    512x512x300 phantom, whose 16 MiB row takes 0.08, 0.11 and 0.15 s of CPU to write (built,
    written, hashed) and 0.03 s to read back at each level. Level 2 keeps 97% of level 3's ratio at
    70% of its CPU. `ctray bench ingest` prints the three."""
    bulk_codec: Literal["lz4", "zstd", "none"] = "lz4"
    """Codec of the volume and label map columns, nearly all of a shard's bytes: what every
    training draw decompresses. Measured per 110x340x340 phantom scan (one core): reading the
    volume and label map takes 31 ms at zstd-3, 14 ms at lz4 and 8 ms uncompressed, for 8.8, 14.3
    and 25 MB; CA-GCL's target draws ~236 scans/s per GPU, so zstd alone would take 7 cores per GPU.
    lz4 halves that for 1.6x the bytes of zstd; "none" for fast local disks, zstd where storage
    bandwidth is what runs short (`ctray bench data --codecs` prints each)."""


class IngestConfig(Section):
    """`ctray ingest`: scans + masks + reports -> preprocessed Parquet shards + manifest.json."""

    input: InputConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    reports: ReportsConfig = Field(default_factory=ReportsConfig)
    output: OutputConfig
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    groups: GroupsConfig = Field(default_factory=GroupsConfig)
    lease: LeaseConfig = Field(default_factory=LeaseConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    concurrency: int | None = Field(None, ge=1)
    """Shard writer tasks submitted at once (None: every shard). Each asks Ray for 1 CPU, the memory
    of `writer_memory` (and 1 GPU with `input.segment`); queued tasks are what an autoscaling
    cluster adds nodes for."""
    task_retries: int = Field(2, ge=0)
    """Times Ray re-runs a shard whose worker process died (a preempted node, out of memory)."""
    task_memory_gb: float | None = Field(None, gt=0)
    """Memory each shard writer task reserves from Ray, in GiB (None: estimated from
    preprocess.max_voxels, see `writer_memory`), so that a node runs no more writers than its
    memory holds the largest scans of. Lower max_voxels to your largest scan rather than this."""

    @model_validator(mode="after")
    def _no_raw_patient_ids(self) -> IngestConfig:
        if self.groups.dicom == "patient" and not self.privacy.pseudonymize_ids:
            raise ValueError(
                "groups.dicom=patient would store raw PatientIDs in the shards: set privacy.pseudonymize_ids=true"
            )
        return self

    def writer_memory(self) -> int:
        """Bytes one shard writer reserves: the process (numpy, nibabel, pyarrow, a Ray worker:
        ~0.75 GiB) and the largest scan max_voxels lets in, 5 B per voxel (8 B with masks).
        `ctray bench ingest` measures ctray's peak at 1.1x the raw int16 volume (2.2 B per voxel,
        a 300x512x512 scan without a mask: the resampling goes slice by slice); the allowance covers
        float32 files (4 B per voxel as stored), the resampled volume (at most max_voxels, refused
        before it is allocated, and in practice fewer voxels than the input: CT is finer in-plane
        than the target spacing, which outweighs upsampling thick slices) and
        with masks the label map as stored and resampled (3 B)."""
        if self.task_memory_gb is not None:
            return int(self.task_memory_gb * 2**30)
        masks = self.input.masks is not None or self.input.segment
        return int(0.75 * 2**30 + (8 if masks else 5) * self.preprocess.max_voxels)

    def writer_shape(self) -> dict[str, float]:
        """The resources one shard writer task asks Ray for."""
        return {"CPU": 1.0, **({"GPU": 1.0} if self.input.segment else {}), "memory": float(self.writer_memory())}
