"""Report text on the CPU side: the run's tokenizer (prepared once on the driver: a configured
file, a hub model's exported to tokenizer.json, or a WordPiece tokenizer trained on the shards'
report sentences), the per-anatomy sentence policies of TotalFM and CA-GCL, and batch tokenisation
into fixed-length id arrays.

Only numpy and the Rust `tokenizers` library at import (no torch): this runs inside Ray Data's
sampler tasks. Samplers handle a hub tokenizer and a trained one the same way.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from typing import TYPE_CHECKING, Any

import numpy as np

from ctray.config import StorageConfig
from ctray.errors import ConfigError
from ctray.storage import arrow_filesystem, filesystem, publish_bytes, read_bytes

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from ctray.models.text import TextConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece(reports: list[list[str]], vocab_size: int, min_reports: int = 5) -> str:
    """A BERT-style (lower-case, WordPiece, [CLS] ... [SEP]) tokenizer trained on report sentences,
    grouped by report; returns its tokenizer.json text. Used when the text encoder is randomly
    initialised, because no hub tokenizer can be downloaded in every environment (and a trained
    one fits the corpus).

    Only words seen in at least `min_reports` reports are learned: a patient's or a physician's
    name in a few reports must not become vocabulary (a whole-word token would let the tokenizer
    file itself leak it). Rarer words are dropped from the training text; at use they are spelled
    with the subwords of common words."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()

    def words(sentence: str) -> list[str]:
        return [w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(sentence))]

    per_report = [[words(s) for s in sentences] for sentences in reports]
    seen_in = Counter(w for report in per_report for w in {w for sentence in report for w in sentence})
    common = {w for w, n in seen_in.items() if n >= min_reports}
    corpus = [" ".join(w for w in sentence if w in common) for report in per_report for sentence in report]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        # show_progress: its bars are blank lines in a log, for a second's work on the driver
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        min_frequency=min_reports,
        show_progress=False,
    )
    tok.train_from_iterator([c for c in corpus if c], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return tok.to_str()


def prepare_tokenizer(text: TextConfig, shards: str, run_dir: str, storage: StorageConfig) -> str:
    """The run's tokenizer.json text: the configured file, the run's own from an earlier attempt,
    the hub model's (exported from transformers), or one trained on the shards' sentences."""
    if text.tokenizer:
        fs, path = filesystem(text.tokenizer, storage)
        return read_bytes(fs, path, storage).decode()
    fs, root = filesystem(run_dir, storage)
    path = posixpath.join(root, "tokenizer.json")
    if fs.exists(path):
        return read_bytes(fs, path, storage).decode()
    if text.model:
        from transformers import AutoTokenizer

        tokenizer_json = AutoTokenizer.from_pretrained(text.model).backend_tokenizer.to_str()
    else:
        reports = report_sentences(shards, storage)
        log.info(
            "training a WordPiece tokenizer (vocab %d, words of >= %d reports) on the sentences of %d reports in %s",
            text.vocab_size,
            text.tokenizer_min_reports,
            len(reports),
            shards,
        )
        tokenizer_json = train_wordpiece(reports, text.vocab_size, text.tokenizer_min_reports)
    publish_bytes(tokenizer_json.encode(), fs, path, storage)
    return tokenizer_json


def report_sentences(shards: str, storage: StorageConfig) -> list[list[str]]:
    """The anatomy sentences of each report in the committed shards (only the anatomy_texts
    column is read)."""
    import pyarrow.parquet as pq

    from ctray.ingest.shardset import ShardSet

    afs, _ = arrow_filesystem(shards, storage)
    paths = sorted(ShardSet.open(shards, storage).shard_paths())
    out: list[list[str]] = []
    for path in paths:
        for texts in pq.read_table(path, columns=["anatomy_texts"], filesystem=afs).column("anatomy_texts").to_pylist():
            sentences = [s for t in texts or [] for s in t["sentences"]]
            if sentences:
                out.append(sentences)
    if not out:
        raise ConfigError(f"{shards}: no report sentences to train a tokenizer on (were reports ingested?)")
    return out


class TextEncoding:
    """tokenizer.json text -> encode(texts) -> (ids int32 (N, L), attention mask uint8 (N, L))."""

    def __init__(self, tokenizer_json: str, max_length: int):
        self.tokenizer_json = tokenizer_json
        self.max_length = max_length
        self._tok: Tokenizer | None = None

    def __getstate__(self) -> dict[str, Any]:  # the Rust object does not pickle; rebuilt lazily in each process
        return {"tokenizer_json": self.tokenizer_json, "max_length": self.max_length, "_tok": None}

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(self.tokenizer_json)
            self._tok.enable_truncation(self.max_length)
            pad = self._tok.token_to_id("[PAD]")
            self._tok.enable_padding(length=self.max_length, pad_id=0 if pad is None else pad)
        return self._tok

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            z = np.zeros((0, self.max_length), dtype=np.int32)
            return z, z.astype(np.uint8)
        enc = self.tokenizer.encode_batch(texts)
        return np.array([e.ids for e in enc], dtype=np.int32), np.array([e.attention_mask for e in enc], dtype=np.uint8)


def clinical_aware(sentences: list[str], rng: np.random.Generator) -> str:
    """CA-GCL's clinical-aware text augmentation (paper section 2.3): a random non-empty subset of
    the anatomy's sentences (partial completeness), in random order (permutation invariance), joined."""
    if not sentences:
        raise ValueError("clinical-aware augmentation needs at least one sentence")
    n = len(sentences)
    keep = rng.random(n) < 0.5
    if not keep.any():
        keep[rng.integers(n)] = True
    chosen = [sentences[i] for i in np.flatnonzero(keep)]
    return " ".join(chosen[i] for i in rng.permutation(len(chosen)))


def one_sentence(sentences: list[str], rng: np.random.Generator) -> str:
    """TotalFM: one finding sentence of the organ per step."""
    return sentences[int(rng.integers(len(sentences)))]


def all_sentences(sentences: list[str], rng: np.random.Generator) -> str:
    """No augmentation: the anatomy's whole text in report order."""
    return " ".join(sentences)


def text_hash(text: str) -> int:
    """A stable 63-bit id of a text (soft targets: identical texts are not negatives of each other)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
