"""The shared text tower's settings, torch-free: recipe configs embed them and are loaded where
torch is not (config validation, `ctray --help`, Ray Data's sampler processes)."""

from __future__ import annotations

from typing import Literal

from ctray.config import Section


class TextConfig(Section):
    """BERT-style text encoder and its tokenizer."""

    model: str | None = None
    """A transformers model name or path (e.g. microsoft/BiomedVLP-CXR-BERT-specialized); None:
    a randomly initialised BERT built from the fields below."""
    tokenizer: str | None = None
    """tokenizer.json (folder or s3:// URI). None: the hub model's tokenizer, or (random init) a
    WordPiece tokenizer trained on the shards' report sentences; either is saved as
    <run>/tokenizer.json and reused when the run resumes."""
    vocab_size: int = 8192
    """Vocabulary of the trained tokenizer and the random-init embedding table."""
    hidden_size: int = 768
    """Random init: BERT width."""
    layers: int = 12
    """Random init: transformer layers."""
    heads: int = 12
    """Random init: attention heads."""
    max_length: int = 64
    """Tokens per text ([CLS] ... [SEP], truncated and padded)."""
    tokenizer_min_patients: int = 5
    """A trained tokenizer learns only words seen in the reports of at least this many patients (the
    shards' groups, from ingest's `groups`; shards without groups: scans), so that names never
    become vocabulary; tiny local data sets may lower it. Digit runs of 6+ and header-field values
    are never learned."""
    pooling: Literal["cls", "mean"] = "cls"
    """cls: the [CLS] token (fVLM, CA-GCL). mean: the mean over the text's tokens, for random-init
    towers on small data (the local jobs and tests): at init a BERT's [CLS] output hardly depends
    on the other tokens (cosine ~1.0 between any two texts), and it takes long to learn otherwise."""
