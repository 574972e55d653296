"""A run's export: what a user loads after pretraining, with the libraries' own classes.

<run>/export/ holds one file or folder per part of the trained model (Task.export_parts):
- a transformers model (VideoMAE, BERT) as a `save_pretrained` folder <part>/ (config.json +
  model.safetensors; the text tower's folder also holds its tokenizer), which
  `transformers.AutoModel.from_pretrained` loads;
- any other module as a folder <part>/ in huggingface_hub's PyTorchModelHubMixin layout:
  model.safetensors (its state_dict) and config.json (its constructor's kwargs), loadable with `strict=True` into the
  class export.json names, built with the kwargs export.json gives (CT-FM's encoder is MONAI's
  `SegResEncoder`; the custom 3D ViT is `ctray.objectives.cagcl.vit.ViT3D`);
- export.json: the objective, its config section ("recipe"), the step, each part's class and kwargs, the
  learned temperature, the sampler's assets and the input preprocessing.

`load_encoder(path)` rebuilds the recipe's task from export.json, loads every part strictly and
returns an `Encoder`: the same `Task.embed` that training-time evaluation runs, the recipe's
sampler as its preprocessing, and the text tower where the objective has one.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ctray.errors import ConfigError
from ctray.models.pretrained import META, load_pretrained_into

if TYPE_CHECKING:
    from ctray.config import StorageConfig
    from ctray.objectives.spec import Assets, Batch, RecipeConfig, Sampler, Task

FORMAT = 2
"""Bump on an incompatible change of the layout. 2: non-transformers parts as PyTorchModelHubMixin
folders (format 1 wrote <part>.safetensors files, still read)."""
READS = (1, 2)
"""The formats load_encoder reads; it refuses others in one line naming the ctray that wrote them."""


@dataclass(frozen=True)
class TrainedOn:
    """What a model was trained on, as export.json records it: `ctray eval` warns when it is given
    embeddings of these same shards (figures that are not held-out)."""

    shards: str
    """The training shard set's URI (credentials redacted)."""
    fingerprint: str
    """Its manifest's preprocessing fingerprint."""
    scans: int
    """Scans it held when training started."""
    preprocess: dict[str, Any] | None = None
    """Its ingest preprocessing (ctray.ingest.config.PreprocessConfig as JSON): what
    `Encoder.embed_volume` applies to a new scan."""


@dataclass(frozen=True)
class ExportRun:
    """What export.json and the model card say of the run that made the export."""

    step: int
    """The optimizer step the weights are from."""
    trained_on: TrainedOn | None = None
    """The training shard set (None: synthetic data)."""
    evaluation: dict[str, float] | None = None
    """The last in-training evaluation's metrics (None: the objective has none, or it did not run)."""


def write_export(task: Task, objective: RecipeConfig, assets: Assets, write: Writer, run: ExportRun) -> list[str]:
    """Every part of `task`, export.json and the model card (README.md) through write(relative name,
    bytes); returns the names. Parameters must be whole (gathered under ZeRO-3) when this runs."""
    from safetensors.torch import save

    parts: dict[str, Any] = {}
    names: list[str] = []
    for name, part in task.export_parts().items():
        if part.cls is None:
            files = {posixpath.join(name, rel): data for rel, data in _pretrained_files(part.module).items()}
            parts[name] = {
                "folder": name,
                "class": f"transformers.{type(part.module).__name__}",
                "kwargs": part.kwargs or {},  # of from_pretrained
            }
        else:
            state = {k: v.detach().float().cpu().contiguous() for k, v in part.module.state_dict().items()}
            # huggingface_hub's PyTorchModelHubMixin layout: a class mixing it in loads the folder.
            files = {
                f"{name}/{HUB_WEIGHTS}": save(state),
                f"{name}/{HUB_CONFIG}": json.dumps(part.kwargs or {}, indent=1).encode(),
            }
            parts[name] = {"folder": name, "class": part.cls, "kwargs": part.kwargs or {}}
        for rel, data in files.items():
            write(rel, data)
            names.append(rel)
    tokenizer = assets.tokenizer_json
    if tokenizer is not None and "text" in parts:
        for rel, data in _tokenizer_files(tokenizer, getattr(objective, "text", None)).items():
            write(posixpath.join("text", rel), data)
            names.append(posixpath.join("text", rel))
    meta = {
        "format": FORMAT,
        "versions": library_versions(),
        "objective": objective.name,
        "step": run.step,
        "recipe": objective.model_dump(mode="json"),
        "parts": parts,
        "assets": assets.for_export().model_dump(mode="json", exclude_none=True),
        "trained_on": None if run.trained_on is None else asdict(run.trained_on),
        **task.export_config(),
    }
    write(META, json.dumps(meta, indent=1).encode())
    write(CARD, model_card(meta, run.evaluation).encode())
    return [*names, META, CARD]


HUB_WEIGHTS, HUB_CONFIG = "model.safetensors", "config.json"
"""A non-transformers part's folder, as huggingface_hub's PyTorchModelHubMixin saves a model."""
CARD = "README.md"
"""The export's model card: YAML front matter (the Hugging Face Hub's fields) and what the model is."""
LIBRARIES = ("ctray", "torch", "transformers", "monai", "deepspeed", "safetensors")


def library_versions() -> dict[str, str | None]:
    """The versions that wrote an export (None: not installed), for export.json and the error a
    later or earlier ctray gives when it cannot read one."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def model_card(meta: dict[str, Any], evaluation: dict[str, float] | None) -> str:
    """README.md of an export: the Hub's front matter (library, licence, tags), the objective and its
    parts, the input it expects, what it was trained on (a shard set's size and fingerprint: no
    patient data, no scan ids) and the in-training evaluation with its protocol."""
    import yaml

    front = {
        "library_name": "ctray",
        "license": "apache-2.0",
        "tags": ["ctray", "medical-imaging", "computed-tomography", "feature-extraction", meta["objective"]],
        "pipeline_tag": "feature-extraction",
    }
    trained = meta.get("trained_on")
    data = (
        f"{trained['scans']} CT scans of one shard set (preprocessing fingerprint `{trained['fingerprint']}`)"
        if trained
        else "synthetic batches only (a smoke test, not a usable model)"
    )
    parts = "\n".join(f"- `{name}`: {spec['class']}" for name, spec in meta["parts"].items())
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {meta['objective']} encoder, pretrained with ctray",
        "",
        f"Step {meta['step']}; written by ctray {meta['versions'].get('ctray')}"
        f" (torch {meta['versions'].get('torch')}, transformers {meta['versions'].get('transformers')}).",
        "",
        "## Parts",
        "",
        parts,
        "",
        "## Input",
        "",
        "```json",
        json.dumps(meta.get("input", "see export.json"), indent=1),
        "```",
        "",
        "## Training data",
        "",
        f"{data}. The licence above is the code's; the weights carry the terms of the data they were trained on.",
        "",
        "## Evaluation",
        "",
    ]
    if evaluation:
        lines += [
            "The in-training evaluation at the last step (zero-shot, thresholds at margin 0; on the run's "
            "`eval.shards`, which are held-out only when the run set them):",
            "",
            "| metric | value |",
            "| --- | --- |",
            *(f"| {k} | {v:.4f} |" for k, v in sorted(evaluation.items()) if k.endswith("_mean")),
        ]
    else:
        lines.append("None at export time: run `ctray embed` and `ctray eval` on a held-out shard set.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import ctray",
        'encoder = ctray.load_encoder("path/to/export")  # the vision encoder, its sampler and text tower',
        "```",
        "",
        "Each part also loads without ctray, strictly, with the class and kwargs export.json names.",
        "",
    ]
    return "\n".join(lines)


Writer = Callable[[str, bytes], None]


def _pretrained_files(model: nn.Module) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="ctray-export-") as d:
        model.save_pretrained(d)
        return _read_tree(d)


def _tokenizer_files(tokenizer_json: str, text_cfg: Any) -> dict[str, bytes]:
    """tokenizer.json plus transformers' tokenizer files, so that AutoTokenizer loads the folder."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=getattr(text_cfg, "max_length", 512),
    )
    with tempfile.TemporaryDirectory(prefix="ctray-export-") as d:
        tok.save_pretrained(d)
        files = _read_tree(d)
    files["tokenizer.json"] = tokenizer_json.encode()  # the run's own, byte for byte
    return files


def _read_tree(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root).replace(os.sep, "/")] = fh.read()
    return out


@dataclass
class Encoder:
    """A loaded export: `embed` a batch of the recipe's sampler (`sampler()`), embed texts where
    the objective has a text tower. Everything runs in eval mode without gradients."""

    objective: str
    config: RecipeConfig
    """The objective section the run trained with."""
    task: Task
    """The recipe's task with every exported part loaded (strict)."""
    meta: dict[str, Any]
    """export.json."""
    assets: Assets

    @property
    def module(self) -> nn.Module:
        """The vision encoder, an instance of the library class export.json names (MONAI
        SegResEncoder, transformers VideoMAEModel, ctray ViT3D)."""
        return self.task.export_parts()[self.meta["vision_part"]].module

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The input the encoder expects (orientation, spacing, window, sizes), from export.json."""
        return dict(self.meta.get("input", {}))

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def anatomies(self) -> list[str] | None:
        return list(getattr(self.task, "anatomies", [])) or None

    @property
    def has_text(self) -> bool:
        return "text" in self.meta["parts"]

    @property
    def temperature(self) -> float:
        """The learned temperature tau (logit scale 1 / tau)."""
        if "temperature" not in self.meta:
            raise ConfigError(f"the {self.objective} export has no text tower and no temperature")
        return float(self.meta["temperature"])

    def sampler(self) -> Sampler:
        """The recipe's CPU sampler with the run's settings: the input pipeline of `embed`."""
        return embed_sampler(self.objective, self.config, self.assets)

    @torch.no_grad()
    def embed_volume(
        self,
        volume: str | np.ndarray,
        spacing: tuple[float, float, float] | None = None,
        orientation: str | None = None,
        label_map: str | np.ndarray | None = None,
        seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        """One scan -> `embed`'s output, through the preprocessing the training shards were written
        with (export.json's trained_on.preprocess: orientation, spacing, foreground crop, the same
        code as `ctray ingest`) and the recipe's embedding sampler, so that it equals the embedding
        of the same scan read from shards. `volume`: a NIfTI path, or an HU array with its voxel
        `spacing` (mm) and `orientation` (axis codes of its axes, e.g. "SPL": axis 0 runs to
        superior). `label_map`: its TotalSegmentator labels on the same grid (a path or array),
        which anatomy objectives need. `seed`: the draw of samplers that draw (CT-FM's does not)."""
        from ctray.anatomy import anatomy_label_ids
        from ctray.ingest.config import PreprocessConfig
        from ctray.ingest.preprocess import anatomy_boxes, preprocess

        recorded = (self.meta.get("trained_on") or {}).get("preprocess")
        if recorded is None:
            raise ConfigError(
                f"the {self.objective} export records no ingest preprocessing (trained on synthetic data or by an "
                "older ctray): embed shards written with it instead"
            )
        cfg = PreprocessConfig.model_validate(recorded)
        scan = _raw_volume(volume, spacing, orientation, "volume")
        mask = None if label_map is None else _raw_volume(label_map, spacing, orientation, "label_map", scan)
        pre = preprocess(scan, mask, cfg)
        row = {
            "volume": [pre.hu.tobytes()],
            "shape": [list(pre.hu.shape)],
            "spacing": [list(pre.spacing)],
            "label_map": [None if pre.labels is None else pre.labels.tobytes()],
            "anatomy_boxes": [
                [] if pre.labels is None else anatomy_boxes(pre.labels, anatomy_label_ids(cfg.anatomies))
            ],
            "anatomy_texts": [[]],
            "labels": [[]],
        }
        return self.embed(self.sampler()(row, np.random.default_rng(seed)))

    @torch.no_grad()
    def embed(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Task.embed: {"embedding": (S, D), ...} (see the recipe's task)."""
        device = next(self.task.parameters()).device
        return self.task.embed({k: torch.as_tensor(v).to(device) for k, v in batch.items()})

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings (CLIP-type objectives only)."""
        if not self.has_text:
            raise ConfigError(f"the {self.objective} export has no text tower (zero-shot needs totalfm_clip or cagcl)")
        return self.task.embed_texts(texts).float()

    def to(self, device: torch.device | str) -> Encoder:
        self.task.to(device)
        return self


def _raw_volume(
    value: str | np.ndarray,
    spacing: tuple[float, float, float] | None,
    orientation: str | None,
    name: str,
    like: Any = None,
) -> Any:
    """A NIfTI path or an array in the given orientation and spacing -> ctray.ingest.volume.RawVolume
    (a label map takes its scan's grid when given as an array)."""
    from ctray.ingest.volume import RawVolume, load_nifti

    if isinstance(value, str):
        return load_nifti(value, name)
    data = np.asarray(value)
    if like is not None and spacing is None:
        return RawVolume(data, like.affine, source=name)
    if spacing is None or orientation is None:
        raise ConfigError(f"embed_volume: an array {name} needs its spacing (mm per axis) and orientation (e.g. SPL)")
    return RawVolume(data, axcodes_affine(orientation, spacing), source=name)


def axcodes_affine(orientation: str, spacing: tuple[float, float, float]) -> np.ndarray:
    """The voxel -> RAS+ affine of an array whose axes run towards `orientation`'s codes (R/L, A/P,
    S/I) with `spacing` mm per voxel, its first voxel at the origin."""
    world = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    codes = orientation.upper()
    if len(codes) != 3 or {world[c][0] for c in codes if c in world} != {0, 1, 2}:
        raise ConfigError(f"embed_volume: orientation {orientation!r} is not three axis codes of R/L, A/P, S/I")
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis, (code, size) in enumerate(zip(codes, spacing, strict=True)):
        row, sign = world[code]
        affine[row, axis] = sign * float(size)
    return affine


def export_uri(path: str, storage: StorageConfig) -> str:
    """A run folder or its export/ folder (local or s3://) -> the export folder's URI."""
    from ctray.storage import filesystem, resolve_uri

    uri = resolve_uri(path).rstrip("/")
    fs, root = filesystem(uri, storage)
    if not fs.exists(posixpath.join(root, META)) and fs.exists(posixpath.join(root, "export", META)):
        uri, root = posixpath.join(uri, "export"), posixpath.join(root, "export")
    if not fs.exists(posixpath.join(root, META)):
        raise ConfigError(f"{uri}: no {META} (not a ctray export; pass a run folder or its export/)")
    return uri


def load_encoder(path: str, storage: StorageConfig | None = None, device: torch.device | str = "cpu") -> Encoder:
    """A run folder or its export/ folder (local, s3:// or gs://), or a Hugging Face Hub model id
    (`org/name`, an export pushed as a repository; downloaded where the Hub is reachable) -> the
    Encoder (see module docstring)."""
    from ctray.config import StorageConfig
    from ctray.storage import local_folder

    storage = storage or StorageConfig()
    if HUB_ID.fullmatch(path) and not os.path.exists(path):
        path = _from_hub(path)
    uri = export_uri(path, storage)
    with local_folder(uri, storage) as root:  # every part is in memory once loaded
        return _load_local(root, uri, device)


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
"""A Hub repository id: one slash, no scheme (a local folder of that name wins)."""


def _from_hub(repo_id: str) -> str:
    """The Hub repository's files in the local Hub cache (huggingface_hub's snapshot_download)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f"{repo_id}: not a local folder; loading from the Hub needs huggingface_hub") from None
    try:
        return str(snapshot_download(repo_id=repo_id))
    except Exception as e:  # offline, unknown repository, no access: one line naming the id
        raise ConfigError(f"{repo_id}: not a local folder, and the Hub did not give it ({type(e).__name__})") from None


def load_sampler(path: str, storage: StorageConfig) -> tuple[dict[str, Any], Sampler]:
    """export.json and the recipe's embedding sampler with the run's settings, without the model."""
    from ctray.storage import filesystem

    uri = export_uri(path, storage)
    fs, root = filesystem(uri, storage)
    meta, config, assets = _recipe(_reader(fs, root, storage), root, uri)  # export.json and tokenizer only
    return meta, embed_sampler(meta["objective"], config, assets)


def _reader(fs: Any, root: str, storage: StorageConfig) -> Callable[[str], bytes | None]:
    """A file of the export folder by relative name (None when absent)."""
    from ctray.storage import read_bytes

    def read(name: str) -> bytes | None:
        path = posixpath.join(root, name)
        return read_bytes(fs, path, storage) if fs.exists(path) else None

    return read


def embed_sampler(name: str, config: RecipeConfig, assets: Assets) -> Sampler:
    """The recipe's embedding sampler (spec.EmbedsWith), else its training sampler."""
    from ctray.objectives import get_objective
    from ctray.objectives.spec import EmbedsWith

    objective = get_objective(name)
    if isinstance(objective, EmbedsWith):
        return objective.embed_sampler(config, assets)
    return objective.sampler(config, assets)


def _recipe(read: Callable[[str], bytes | None], root: str, uri: str) -> tuple[dict[str, Any], RecipeConfig, Assets]:
    """export.json, the objective section (its text tower pointed at <root>/text) and the assets
    (with the tokenizer), from the export's files."""
    from pydantic import ValidationError

    import ctray
    from ctray.objectives import objective_config
    from ctray.objectives.config import Assets

    meta = json.loads(read(META) or b"{}")
    made = (meta.get("versions") or {}).get("ctray") or "before 0.2"
    if meta.get("format") not in READS:
        raise ConfigError(
            f"{uri}: export format {meta.get('format')} (ctray {made}); this ctray {ctray.__version__} reads formats "
            f"{', '.join(map(str, READS))}"
        )
    try:
        config = objective_config(_offline(meta["recipe"], root))
        assets = Assets.model_validate(meta.get("assets", {}))
    except (ValidationError, ValueError) as e:
        # The field's place only: a value could be anything the export holds.
        where = e.errors()[0]["loc"] if isinstance(e, ValidationError) and e.errors() else ()
        field = ".".join(str(p) for p in where) or "objective"
        raise ConfigError(
            f"{uri}: written by ctray {made}, whose recipe settings this ctray {ctray.__version__} cannot read "
            f"(at {field}); load it with ctray {made}"
        ) from None
    tokenizer = read("text/tokenizer.json")
    if tokenizer is not None:
        assets = assets.model_copy(update={"tokenizer_json": tokenizer.decode()})
    return meta, config, assets


def _load_local(root: str, uri: str, device: torch.device | str) -> Encoder:
    from fsspec.implementations.local import LocalFileSystem
    from safetensors.torch import load_file

    from ctray.config import StorageConfig
    from ctray.objectives import get_objective

    meta, config, assets = _recipe(_reader(LocalFileSystem(), root, StorageConfig()), root, uri)
    task = get_objective(meta["objective"]).task(config, assets)
    parts = task.export_parts()
    if set(parts) != set(meta["parts"]):
        raise ConfigError(f"{uri}: parts {sorted(meta['parts'])} do not match the {meta['objective']} recipe's")
    for name, part in parts.items():
        saved = meta["parts"][name]
        if str(saved["class"]).startswith("transformers."):
            load_pretrained_into(part.module, os.path.join(root, saved["folder"]), saved.get("kwargs", {}))
        else:  # format 2's hub folder, or format 1's file
            weights = os.path.join(saved["folder"], HUB_WEIGHTS) if "folder" in saved else saved["file"]
            part.module.load_state_dict(load_file(os.path.join(root, weights)), strict=True)
    if "temperature" in meta:
        task.temperature.tau.data.fill_(float(meta["temperature"]))
    task.eval().to(device)
    return Encoder(meta["objective"], config, task, meta, assets)


_STARTING_WEIGHTS = ("init_from", "vit_init")
"""Objective fields naming weights a run starts from (TotalFM's stage 1, CA-GCL's 2D ViT): the
export holds the trained ones, so a rebuilt task loads none of them (nor downloads them)."""


def _offline(config: dict[str, Any], root: str) -> dict[str, Any]:
    """The objective section as the task is rebuilt from it here: no starting weights loaded (the
    export holds the trained weights) and a text tower from the export's folder, not a hub download."""
    config = json.loads(json.dumps(config))
    for field in _STARTING_WEIGHTS:
        if field in config:
            config[field] = None
    if isinstance(config.get("text"), dict) and config["text"].get("model"):
        config["text"]["model"] = os.path.join(root, "text")
    return config
