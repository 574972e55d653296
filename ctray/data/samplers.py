"""CPU samplers: shard rows -> training examples, run in Ray Data map_batches tasks.

Only numpy and the shard schema here: every Ray Data task process unpickles its sampler, and a
sampler that imported torch or MONAI would cost each new process seconds before its first scan.
"""

from __future__ import annotations

import numpy as np

from ctray.data.schema import volume_of


class PatchSampler:
    """M random patches per scan (CT-FM): rows -> {"patches": int16 (rows, M, d, h, w)}.

    Patch corners are uniform over the volume (MONAI RandSpatialCropSamples, as CT-FM); a volume
    smaller than a patch along an axis is first padded with `pad` HU (air), as CT-FM's SpatialPad.
    """

    columns = ("volume", "shape")

    def __init__(self, patches_per_scan: int, patch_size: tuple[int, int, int], pad: int = -1024, seed: int | None = None):
        self.m = patches_per_scan
        self.size = tuple(patch_size)
        self.pad = pad
        self.seed = seed

    def sample(self, vol: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((self.m, *self.size), dtype=np.int16)
        short = [max(0, p - s) for p, s in zip(self.size, vol.shape)]
        if any(short):
            vol = np.pad(vol, [(d // 2, d - d // 2) for d in short], constant_values=self.pad)
        starts = [rng.integers(0, s - p + 1, size=self.m) for s, p in zip(vol.shape, self.size)]
        d, h, w = self.size
        for i in range(self.m):
            z, y, x = starts[0][i], starts[1][i], starts[2][i]
            out[i] = vol[z : z + d, y : y + h, x : x + w]
        return out

    def __call__(self, batch) -> dict:
        # Fresh entropy per call (Ray ships this object to every task, so a generator stored in it
        # would replay the same patch positions each epoch); a fixed seed is for tests.
        rng = np.random.default_rng(self.seed)
        return {"patches": np.stack([self.sample(vol, rng) for vol in volumes(batch)])}


def volumes(batch) -> list[np.ndarray]:
    """The int16 volumes of a batch of shard rows, without copying them.

    A pyarrow batch (map_batches batch_format="pyarrow") is read straight from the Arrow data
    buffer: the numpy batch format would first copy every volume into a Python bytes object,
    which costs more than sampling the patches. A dict of columns (tests, numpy format) works too.
    """
    if isinstance(batch, dict):
        return [volume_of({"volume": v, "shape": s}) for v, s in zip(batch["volume"], batch["shape"])]
    col = batch.column("volume").combine_chunks()
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset : col.offset + len(col) + 1]
    data = col.buffers()[2]
    shapes = batch.column("shape").to_pylist()
    return [
        np.frombuffer(data, dtype=np.int16, count=(int(offsets[i + 1]) - int(offsets[i])) // 2, offset=int(offsets[i])).reshape(shapes[i])
        for i in range(len(col))
    ]


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

    def __init__(self, anatomies: list[str], findings: dict[str, str], encoding, policy: str):
        from ctray.data import text

        self.anatomies = list(anatomies)
        self.findings = dict(findings)
        self.encoding = encoding
        self.pick = {"one": text.one_sentence, "clinical_aware": text.clinical_aware, "all": text.all_sentences}[policy]
        self.hash = text.text_hash

    def __call__(self, rows: list[dict], region: np.ndarray, rng: np.random.Generator) -> dict:
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
        return {"text_ids": ids, "text_mask": mask, "text_hash": hashes, "present": present, "abnormal": abnormal, "finding_labels": labels}


class OrganSampler:
    """TotalFM organ volumes: rows -> {"organs": float16 (S, A, T, H, W) in [0, 1], "present": ...}.

    For each anatomy with a stored bounding box: the box plus `margin_mm` on every side (clipped to
    the scan), resampled linearly to `size` (T axial slices = the frames of a video, H, W) and
    windowed. Batches are organ-separated: axis 1 is the organ, so every organ's volumes stay
    together and the contrastive stage draws its negatives within an organ. With `texts` set (stage
    2) the anatomy text fields are added and "present" also needs a text.
    """

    def __init__(self, anatomies: list[str], size: tuple[int, int, int], margin_mm: float, window: tuple[float, float], texts: AnatomyTexts | None = None, seed: int | None = None):
        self.anatomies = list(anatomies)
        self.size = tuple(size)
        self.margin_mm = margin_mm
        self.window = window
        self.texts = texts
        self.seed = seed
        self.columns = ("volume", "shape", "spacing", "anatomy_boxes") + (texts.columns if texts else ())

    def organ(self, vol: np.ndarray, box: list[int], spacing: list[float]) -> np.ndarray:
        from ctray.ingest.resample import resample_linear, size_map

        lo = [max(0, b - int(round(self.margin_mm / sp))) for b, sp in zip(box[:3], spacing)]
        hi = [min(n, b + int(round(self.margin_mm / sp))) for b, sp, n in zip(box[3:], spacing, vol.shape)]
        crop = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        maps = tuple(size_map(n, m) for n, m in zip(crop.shape, self.size))
        return window01(resample_linear(crop, maps), *self.window)

    def __call__(self, batch) -> dict:
        rng = np.random.default_rng(self.seed)
        rows = small_columns(batch, self.columns)
        organs = np.zeros((len(rows), len(self.anatomies), *self.size), dtype=np.float16)
        region = np.zeros((len(rows), len(self.anatomies)), dtype=bool)
        for i, (vol, row) in enumerate(zip(volumes(batch), rows)):
            boxes = {b["anatomy"]: b["box"] for b in row["anatomy_boxes"] or []}
            for j, anatomy in enumerate(self.anatomies):
                if anatomy in boxes:
                    organs[i, j] = self.organ(vol, boxes[anatomy], row["spacing"])
                    region[i, j] = True
        out = {"organs": organs, "present": region.astype(np.uint8), "region": region.astype(np.uint8)}
        if self.texts is not None:
            out.update(self.texts(rows, region, rng))
        return out


class AnatomyScanSampler:
    """CA-GCL scans: rows -> {"scan": float16 (S, D, H, W) in [0, 1], "anatomy_tokens": uint8
    (S, A, tokens), "region", text fields}.

    The scan is resized linearly to the ViT input `size` (fVLM: 112x256x352) and windowed; its label
    map is resized nearest-neighbour and each anatomy's mask is max-pooled to the ViT token grid
    (`patch`), which selects the tokens the anatomy's query attends to. Done here on the CPU so the
    device receives a few bytes of token mask instead of the label map.
    """

    def __init__(self, anatomy_ids: dict[str, list[int]], size: tuple[int, int, int], patch: tuple[int, int, int], window: tuple[float, float], texts: AnatomyTexts, seed: int | None = None):
        if any(s % p for s, p in zip(size, patch)):
            raise ValueError(f"input size {list(size)} is not a multiple of the patch {list(patch)}")
        self.anatomy_ids = {a: list(ids) for a, ids in anatomy_ids.items()}
        self.size, self.patch = tuple(size), tuple(patch)
        self.grid = tuple(s // p for s, p in zip(self.size, self.patch))
        self.window = window
        self.texts = texts
        self.seed = seed
        self.columns = ("volume", "shape", "label_map") + texts.columns

    def token_masks(self, labels: np.ndarray) -> np.ndarray:
        """(D, H, W) label ids -> (A, tokens) uint8: the anatomy covers part of the token's patch."""
        g = self.grid
        pz, py, px = self.patch
        out = np.zeros((len(self.anatomy_ids), int(np.prod(g))), dtype=np.uint8)
        for j, ids in enumerate(self.anatomy_ids.values()):
            hit = np.isin(labels, ids).reshape(g[0], pz, g[1], py, g[2], px)
            out[j] = hit.any(axis=(1, 3, 5)).reshape(-1)
        return out

    def __call__(self, batch) -> dict:
        from ctray.ingest.resample import resample_linear, resample_nearest, size_map

        rng = np.random.default_rng(self.seed)
        rows = small_columns(batch, self.columns)
        label_maps = batch["label_map"] if isinstance(batch, dict) else batch.column("label_map").to_pylist()
        scans = np.zeros((len(rows), *self.size), dtype=np.float16)
        tokens = np.zeros((len(rows), len(self.anatomy_ids), int(np.prod(self.grid))), dtype=np.uint8)
        for i, (vol, lab) in enumerate(zip(volumes(batch), label_maps)):
            maps = tuple(size_map(n, m) for n, m in zip(vol.shape, self.size))
            scans[i] = window01(resample_linear(vol, maps), *self.window)
            if lab is not None:
                tokens[i] = self.token_masks(resample_nearest(np.frombuffer(lab, dtype=np.uint8).reshape(vol.shape), maps))
        region = tokens.any(axis=2)
        out = {"scan": scans, "anatomy_tokens": tokens, "region": region.astype(np.uint8)}
        out.update(self.texts(rows, region, rng))
        return out


def small_columns(batch, columns) -> list[dict]:
    """Rows of a batch as dicts of its small columns (the volume and label map stay in Arrow)."""
    names = [c for c in columns if c not in ("volume", "label_map")]
    if isinstance(batch, dict):
        return [{k: batch[k][i] for k in names} for i in range(len(batch["shape"]))]
    return batch.select(names).to_pylist()
