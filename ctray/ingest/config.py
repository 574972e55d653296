"""Typed config of `ctray ingest` (see jobs/ingest.yaml for a complete example)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ctray.config import RayConfig, Section, StorageConfig
from ctray.ingest.anatomy import DEFAULT_ANATOMIES, anatomy_label_ids


class InputConfig(Section):
    """Where scans, masks and reports come from."""

    scans: str
    """Folder or URI holding NIfTI files (*.nii, *.nii.gz) and/or DICOM series (one folder of
    .dcm files per series). The scan id is the file name without extension, or the folder name."""
    reports: str | None = None
    """Reports table: CSV or JSONL with columns `scan_id` and `report`; other 0/1 columns are kept
    as finding labels. None: no reports (image-only objectives such as CT-FM)."""
    report_id_column: str = "scan_id"
    """Column (CSV) or key (JSONL) of the scan id in the reports table."""
    report_text_column: str = "report"
    """Column or key of the report text."""
    require_report: bool = True
    """With a reports table: a scan whose report is missing, empty or not UTF-8 is quarantined.
    False keeps such scans with empty anatomy texts."""
    masks: str | None = None
    """Folder or URI of TotalSegmentator v2 "total" label maps named like their scans (NIfTI)."""
    require_mask: bool = True
    """With a masks folder: a scan without a mask is quarantined. False keeps it without labels."""
    segment: bool = False
    """Run TotalSegmentator's Python API in Ray Data actors (GPU when the cluster has one) for scans
    without a mask. Needs `pip install ctray[segment]` and the task's weights installed."""
    segment_fast: bool = False
    """Use TotalSegmentator's fast (3 mm) model."""


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
    """HU threshold that separates the body from the surrounding air."""
    min_hu_required: float = -500.0
    """A CT of a body holds air, so its minimum must be at or below this; images whose minimum is
    higher (MR, PET, already-normalised data) are quarantined as a non-CT intensity range."""
    max_hu_allowed: float = 32767.0
    """Maximum HU accepted (int16 storage); larger values mean a wrong slope or a non-CT image."""
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
    """An OpenAI-compatible chat endpoint (vLLM, Ollama, a hosted API) that splits reports."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """Endpoint root; ctray POSTs to {base_url}/chat/completions."""
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    """Model name the endpoint serves."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (may be unset for local servers); never logged."""
    timeout_s: float = 60.0
    """Timeout of one request."""
    retries: int = 3
    """Attempts per report (invalid JSON or schema counts as a failed attempt)."""


class ReportsConfig(Section):
    """How reports become anatomy-level finding sentences."""

    parser: Literal["rules", "llm"] = "rules"
    """`rules`: offline, deterministic sentence split + anatomy lexicon. `llm`: the endpoint below,
    falling back to the rules (reason recorded per scan) when it fails."""
    llm: LLMConfig = Field(default_factory=LLMConfig)
    """Endpoint settings, used when parser is `llm`."""


class OutputConfig(Section):
    """Where shards and the manifest go."""

    uri: str
    """Folder or URI (s3://bucket/prefix) of the shard set."""
    scans_per_shard: int = Field(16, ge=1)
    """Scans per Parquet file; one Ray task writes one shard."""
    compression_level: int = 3
    """zstd level of the Parquet column chunks."""


class IngestConfig(Section):
    """`ctray ingest`: scans + masks + reports -> preprocessed Parquet shards + manifest.json."""

    input: InputConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    reports: ReportsConfig = Field(default_factory=ReportsConfig)
    output: OutputConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    concurrency: int | None = None
    """Shard writers running at once (None: one per CPU of the Ray cluster)."""
