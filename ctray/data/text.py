"""Report text on the CPU side: the run's tokenizer (prepared once on the driver: a configured
file, a hub model's exported to tokenizer.json, or a WordPiece tokenizer trained on the shards'
report sentences), the per-anatomy sentence policies of TotalFM and CA-GCL, and batch tokenisation
into fixed-length id arrays.

Only numpy and the Rust `tokenizers` library at import (no torch): this runs inside Ray Data's
sampler tasks. Samplers handle a hub tokenizer and a trained one the same way.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import posixpath
import re
from collections import Counter, defaultdict
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np

from ctray.config import StorageConfig
from ctray.errors import ConfigError, StorageError
from ctray.storage import arrow_filesystem, filesystem, publish_bytes, read_bytes

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from ctray.models.text import TextConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DIGIT_RUN = re.compile(r"\d{6,}")
"""A word a trained tokenizer never learns: an MRN, an accession number, a date written as digits."""


def train_wordpiece(
    reports: list[list[str]], vocab_size: int, min_patients: int = 5, patients: list[str] | None = None
) -> str:
    """A BERT-style (lower-case, WordPiece, [CLS] ... [SEP]) tokenizer trained on report sentences,
    grouped by report; returns its tokenizer.json text. Used when the text encoder is randomly
    initialised, because no hub tokenizer can be downloaded in every environment (and a trained
    one fits the corpus).

    Only words seen in the reports of at least `min_patients` patients are learned (`patients`: each
    report's patient, the shards' group; None: each report its own): a patient's name in all their
    reports, or a physician's in a few patients', must not become vocabulary, since the tokenizer
    file travels with every run and export. Counting reports would let one patient with five
    reports put their name in it. Runs of 6 or more digits (MRNs, accession numbers, dates) and the
    values of header fields ("MRN: ...", HEADER_KEY_WORDS) are never learned, however common.
    Words left out are dropped from the training text; at use they are spelled with the subwords
    of common words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()

    def words(sentence: str) -> list[str]:
        return [w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(sentence))]

    per_report = [[_learnable(words(s)) for s in sentences] for sentences in reports]
    owners = patients if patients is not None else [str(i) for i in range(len(reports))]
    seen_by: dict[str, set[str]] = defaultdict(set)
    for report, patient in zip(per_report, owners, strict=True):
        for sentence in report:
            for w in sentence:
                seen_by[w].add(patient)
    common = {w for w, who in seen_by.items() if len(who) >= min_patients}
    counts: Counter[str] = Counter(w for report in per_report for sentence in report for w in sentence if w in common)
    vocab = wordpiece_vocab(counts, vocab_size, min_patients)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return tok.to_str()


def wordpiece_vocab(counts: Counter[str], vocab_size: int, min_frequency: int) -> list[str]:
    """A WordPiece vocabulary learned from word counts in the manner of the tokenizers library's
    WordPieceTrainer (BPE merges over the words' characters, pieces after a word's first character marked
    "##", a merge only of pairs seen at least `min_frequency` times), by hand because that trainer
    breaks ties between pairs of equal count in its hash maps' order, which differs per process: the
    same corpus gave two runs different vocabularies (and a run's texts other ids after a restart
    on another node). Here ties go to the first pair in code-point order, and ids are given in a
    fixed order: SPECIAL_TOKENS, the characters (sorted), then the merges in the order made."""
    pieces = {w: [w[0], *("##" + c for c in w[1:])] for w in sorted(counts)}
    vocab = [*SPECIAL_TOKENS, *sorted({p for ps in pieces.values() for p in ps} - set(SPECIAL_TOKENS))]
    known = set(vocab)
    pairs: Counter[tuple[str, str]] = Counter()
    holders: dict[tuple[str, str], set[str]] = defaultdict(set)
    for w, ps in pieces.items():
        for pair in pairwise(ps):
            pairs[pair] += counts[w]
            holders[pair].add(w)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        n, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -n:
            continue  # a stale entry: the pair's count changed since it was pushed
        if -n < min_frequency:
            break
        a, b = pair
        merged = a + b[2:]
        changed: set[tuple[str, str]] = set()
        for w in sorted(holders.pop(pair)):
            old = pieces[w]
            for p in pairwise(old):
                pairs[p] -= counts[w]
                holders[p].discard(w)
                changed.add(p)
            pieces[w] = new = _merged(old, pair, merged)
            for p in pairwise(new):
                pairs[p] += counts[w]
                holders[p].add(w)
                changed.add(p)
        del pairs[pair]
        for p in sorted(changed - {pair}):
            if pairs[p] > 0:
                heapq.heappush(heap, (-pairs[p], p))
            else:
                pairs.pop(p, None)
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
    return vocab


def _merged(pieces: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    """`pieces` with every occurrence of `pair`, left to right, replaced by `merged`."""
    out, i = [], 0
    while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(pieces[i])
            i += 1
    return out


def _learnable(words: list[str]) -> list[str]:
    """The words a tokenizer may learn from, in order: without digit runs of 6+ and without the
    value of a header field (a HEADER_KEY_WORDS key and a colon: the words up to the sentence's end)."""
    from ctray.ingest.reports import HEADER_KEY_WORDS

    out: list[str] = []
    for i, w in enumerate(words):
        if w == ":" and i and words[i - 1] in HEADER_KEY_WORDS:
            return out
        if not DIGIT_RUN.fullmatch(w):
            out.append(w)
    return out


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
        from ctray.ingest.derived import record_derived
        from ctray.ingest.shardset import ShardSet

        names = sorted(s.shard for s in ShardSet.open(shards, storage).shards)
        tokenizer_json = shard_set_tokenizer(text, shards, names, storage)
        # The run saw these shards' reports: `ctray purge` of one of them names it (ctray.ingest.derived).
        record_derived(shards, storage, "tokenizer", run_dir, names)
    publish_bytes(tokenizer_json.encode(), fs, path, storage)
    return tokenizer_json


def shard_set_tokenizer(text: TextConfig, shards: str, names: list[str], storage: StorageConfig) -> str:
    """The WordPiece tokenizer of the shards' report sentences at these settings: trained once per
    shard set and kept in it (`_tokenizers/<key>.json`, the key a hash of the settings and the
    shards' `names`), so every run on the shards gets the same bytes without training again. Training
    is a pure function of the sentences and the settings (train_wordpiece), so the cache changes no
    result; a shard set this process cannot write to trains per run. A purge drops the folder."""
    from ctray.ingest.derived import SHARED_TOKENIZERS

    settings = {"vocab": text.vocab_size, "min_patients": text.tokenizer_min_patients, "shards": names}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    fs, root = filesystem(shards, storage)
    path = posixpath.join(root, SHARED_TOKENIZERS, key + ".json")
    try:
        tokenizer_json = read_bytes(fs, path, storage).decode()
        log.info(
            "using the shard set's tokenizer %s (vocab %d)",
            posixpath.join(shards, SHARED_TOKENIZERS, key),
            text.vocab_size,
        )
        return tokenizer_json
    except FileNotFoundError:
        pass
    reports, patients = report_sentences(shards, storage)
    log.info(
        "training a WordPiece tokenizer (vocab %d, words of >= %d patients) on the sentences of %d reports "
        "of %d patients (the shards' groups) in %s",
        text.vocab_size,
        text.tokenizer_min_patients,
        len(reports),
        len(set(patients)),
        shards,
    )
    tokenizer_json = train_wordpiece(reports, text.vocab_size, text.tokenizer_min_patients, patients)
    try:
        publish_bytes(tokenizer_json.encode(), fs, path, storage)
    except (StorageError, OSError) as e:
        log.warning(
            "%s: could not keep the tokenizer in the shard set (%s): each run trains its own", shards, type(e).__name__
        )
    return tokenizer_json


def report_sentences(shards: str, storage: StorageConfig) -> tuple[list[list[str]], list[str]]:
    """The anatomy sentences of each report in the committed shards, and each report's patient
    (its scan's group: ingest's `groups`, else the scan itself). Only those two columns are read."""
    import pyarrow.parquet as pq

    from ctray.ingest.shardset import ShardSet

    afs, _ = arrow_filesystem(shards, storage)
    paths = sorted(ShardSet.open(shards, storage).shard_paths())
    out: list[list[str]] = []
    patients: list[str] = []
    for path in paths:
        table = pq.read_table(path, columns=["anatomy_texts", "group"], filesystem=afs)
        for texts, group in zip(
            table.column("anatomy_texts").to_pylist(), table.column("group").to_pylist(), strict=True
        ):
            sentences = [s for t in texts or [] for s in t["sentences"]]
            if sentences:
                out.append(sentences)
                patients.append(str(group))
    if not out:
        raise ConfigError(f"{shards}: no report sentences to train a tokenizer on (were reports ingested?)")
    return out, patients


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
