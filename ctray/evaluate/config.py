"""Evaluation settings, torch-free (recipe configs embed the zero-shot ones). `ctray eval`: where
the embeddings are, where the report goes, and the settings of each evaluation (zero-shot prompts,
bootstrap, probes, retrieval, the anatomy map)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ctray.anatomy import DEFAULT_FINDINGS
from ctray.config import Section, StorageConfig

DEFAULT_TEMPLATES = [
    ("{finding} in the {anatomy}.", "no {finding} in the {anatomy}."),
    ("There is {finding} in the {anatomy}.", "There is no {finding} in the {anatomy}."),
    ("The {anatomy} shows {finding}.", "The {anatomy} shows no {finding}."),
    ("Evidence of {finding}.", "No evidence of {finding}."),
    ("{finding} is present.", "{finding} is absent."),
    ("Findings consistent with {finding} in the {anatomy}.", "The {anatomy} is normal."),
]


class ZeroShotConfig(Section):
    """Zero-shot evaluation prompts and the finding labels they are scored against."""

    findings: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_FINDINGS))
    """Finding label (a `labels` name in the shards) -> the anatomy whose embedding scores it.
    Default: ctray.anatomy.DEFAULT_FINDINGS (the phantoms draw theirs from it); real data names its
    reports table's labels here."""
    templates: list[tuple[str, str]] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    """(present, absent) prompt pairs with {finding} and {anatomy} placeholders (>= 5 recommended)."""
    finding_prompts: dict[str, tuple[str, str]] = Field(default_factory=dict)
    """Finding -> its own (present, absent) prompts, used instead of every template for that finding
    (e.g. the wording of the data set's reports)."""
    lesion_term: str = "a lesion"
    """{finding} in the anatomy-wise lesion-presence prompts."""


class ProbeConfig(Section):
    """Linear probe and kNN on frozen embeddings, k-fold cross-validated (scikit-learn)."""

    folds: int = Field(5, ge=2)
    """Stratified group folds (a patient's scans stay in one fold); capped per label to the groups
    of its minority class (a label with fewer than 2 groups of either class is skipped, and the
    report says so)."""
    labelled_fractions: list[float] = Field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    """Fractions of each training fold (stratified, at least one scan per class) that the probes
    are fitted on, for the label-efficiency curve; the largest gives the headline numbers."""
    knn_k: int = Field(10, ge=1)
    """Neighbours of the kNN classifier (cosine); capped to the training scans of a fold."""
    cs: list[float] = Field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0])
    """Inverse L2 strengths the logistic-regression probe chooses from inside each training fold
    (LogisticRegressionCV, by AUROC over `inner_folds` group folds), as linear-probe papers sweep
    it; one value fixes it."""
    inner_folds: int = Field(3, ge=2)
    """Group folds of each training fold that choose C (fewer when the fold has fewer groups of a
    class; the middle C of `cs` when fewer than 2 inner folds hold both classes)."""
    max_iter: int = Field(2000, ge=1)
    """Iterations of the logistic-regression solver."""

    @field_validator("labelled_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError(f"labelled_fractions must be non-empty and in (0, 1], got {v}")
        return sorted(set(v))


class RetrievalConfig(Section):
    """Retrieval by cosine similarity under three protocols (ctray.evaluate.retrieval): leave one
    group out within the evaluation set, CT-FM's test queries against a training gallery, CT-CLIP's
    label overlap."""

    k: list[int] = Field(default_factory=lambda: [1, 5, 10])
    """k of precision@k, average precision@k, hit rate@k and text-to-scan recall@k (capped to the
    smallest gallery)."""
    overlap_k: list[int] = Field(default_factory=lambda: [1, 5, 10, 50])
    """k of CT-CLIP's label overlap (its volume-to-volume retrieval reports 1, 5, 10 and 50)."""
    gallery: str | None = None
    """CT-FM's protocol: an embeddings folder of training scans (`ctray embed` of the training shards,
    same export) that the evaluation scans query. None: a `gallery_fraction` of the evaluation set's
    groups (drawn with the seed) serves as the gallery and the other groups query it."""
    gallery_fraction: float = Field(0.5, gt=0, lt=1)
    """Share of the evaluation set's groups in the gallery when `gallery` is None."""

    @field_validator("k", "overlap_k")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:
            raise ValueError(f"k must be positive integers, got {v}")
        return sorted(set(v))


class EvalReportConfig(Section):
    """`ctray eval`: metrics, plots and a report over an embeddings folder written by `ctray embed`."""

    embeddings: str
    """The embeddings folder (local path or s3:// URI): part-*.parquet and embed.json."""
    out: str | None = None
    """Report folder; None: <embeddings>/report."""
    zero_shot: ZeroShotConfig = Field(default_factory=ZeroShotConfig)
    """Prompts of the zero-shot metrics (CLIP-type embeddings only: those with text embeddings).
    A finding's anatomy comes from embed.json's finding_anatomies; `zero_shot.findings` maps the
    findings it leaves out."""
    threshold: Literal["validation", "margin", "test_roc_corner"] = "validation"
    """Where the thresholded zero-shot metrics cut the margin (ctray.evaluate.thresholds):
    validation (the ROC corner of a validation split by group, metrics on the rest), margin (> 0,
    nothing tuned), test_roc_corner (fVLM's and CT-CLIP's protocol: tuned on the test scans,
    optimistic). AUROC is the same under all three protocols' scans, threshold-free."""
    validation_fraction: float = Field(0.3, gt=0, lt=1)
    """Share of the groups held out to choose thresholds (threshold: validation)."""
    bootstrap: int = Field(1000, ge=0)
    """Bootstrap resamples of the groups (patients) for the confidence intervals of zero-shot,
    probe, kNN and retrieval figures (0: none)."""
    ci: float = Field(0.95, gt=0, lt=1)
    """Coverage of the percentile bootstrap intervals."""
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    """Linear probe and kNN."""
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    """Retrieval protocols and their k."""
    tsne_points: int = Field(3000, ge=10)
    """At most this many anatomy embeddings (drawn with the seed) in the t-SNE map."""
    seed: int = 0
    """Seed of every random draw: bootstrap resamples, folds, labelled subsets, t-SNE."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """How the embeddings and the report folder are reached."""
