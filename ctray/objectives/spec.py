"""The contract between the trainer and a recipe: what an objective provides, typed.

A recipe (one folder under ctray/objectives/) supplies an `Objective`: its typed config (a
`RecipeConfig` whose `name` is a Literal; torch-free, ctray.objectives.config), a driver-side
`prepare`, a numpy-only CPU `sampler` (Ray Data map_batches UDF), a device `task` (augmentation +
model + loss + export, and optionally evaluation) and a default sweep space. The registry
(ctray.objectives) holds one instance per recipe; the trainer, the config loader, the CLI,
`ctray bench` and `ctray sweep` ask it and know no recipe by name.

The types a recipe needs are named here, wherever they live: `Sampler` (ctray.data.samplers: the
Ray Data side imports it without torch), `Evaluation` (ctray.evaluate.result), `RecipeConfig` and
`Assets` (ctray.objectives.config).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from ctray.data.samplers import Sampler
from ctray.evaluate.result import Evaluation
from ctray.objectives.config import Assets, RecipeConfig

if TYPE_CHECKING:
    from ctray.run_folder import RunFolder

__all__ = [
    "Assets",
    "Batch",
    "BenchProfile",
    "EmbedsWith",
    "Evaluates",
    "Evaluation",
    "ExportPart",
    "Objective",
    "RecipeConfig",
    "Sampler",
    "SweepSpace",
    "Task",
    "layer_norm_part",
    "linear_part",
]

SweepSpace = Mapping[str, Mapping[str, Any]]
"""Dotted config path -> {grid|choice|uniform|loguniform: values} (ctray.tune.config.ParamSpace)."""

Batch = dict[str, torch.Tensor]
"""A device batch: the sampler's arrays as tensors, keyed as the sampler named them."""


@dataclass(frozen=True)
class ExportPart:
    """One exported module (ctray.export): a transformers PreTrainedModel (saved with
    save_pretrained), or any module with the class (dotted path) and kwargs that rebuild it for a
    strict load."""

    module: nn.Module
    cls: str | None = None
    """None: a transformers model (its folder's config.json names its class)."""
    kwargs: dict[str, Any] | None = None
    """The class's constructor arguments; for a transformers model, from_pretrained's."""


def linear_part(m: nn.Linear) -> ExportPart:
    return ExportPart(m, "torch.nn.Linear", {"in_features": m.in_features, "out_features": m.out_features})


def layer_norm_part(m: nn.LayerNorm) -> ExportPart:
    return ExportPart(m, "torch.nn.LayerNorm", {"normalized_shape": list(m.normalized_shape), "eps": m.eps})


C = TypeVar("C", bound=RecipeConfig)
C_contra = TypeVar("C_contra", bound=RecipeConfig, contravariant=True)


class Task(nn.Module):
    """A recipe's device side. forward(batch) -> {"loss": scalar, "views": a CPU scalar (views or
    volumes in the batch, for throughput), other scalars to log}.

    The training step should ask the device for no value (`.item()`, `float(t)`, `.nonzero()`,
    boolean indexing, a Python `if` on a tensor): each such read waits for every kernel queued
    before it, so the host cannot queue the next work ahead, the next batch's copy stops overlapping
    the step, and CUDA graphs and a whole-graph torch.compile are ruled out
    (tests/unit/test_batch_path.py counts them). A size that depends on the batch's values belongs
    in `host_fields`."""

    def host_fields(self, batch: Batch) -> Batch:
        """Tensors the step needs whose SIZE depends on the batch's values (e.g. the indices of the
        present organs), computed from the host batch before it is copied to the device (the
        training loop's DevicePrefetcher and its synthetic batch): their sizes then reach the step
        as shapes, where a size counted on the device would have to be read back. forward() takes
        the batch with them, and derives them on the device when they are absent (a batch from
        elsewhere: evaluation, tests). None by default."""
        return {}

    def export_parts(self) -> dict[str, ExportPart]:
        """Part name -> module, exported at the end of training (ctray.export): a transformers
        model as a save_pretrained folder, any other module as safetensors + its class and kwargs."""
        raise NotImplementedError

    def export_config(self) -> dict[str, Any]:
        """JSON-able fields of export.json: "vision_part" (the part that is the vision encoder),
        "input" (the preprocessing it expects), "embedding" (what `embed` returns), and
        "temperature" for objectives with a text tower."""
        raise NotImplementedError

    def embed(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Frozen embeddings of a batch of the recipe's sampler, without augmentation: "embedding"
        (S, D) for every objective; anatomy objectives add "anatomy_embedding" (S, A, D) and, with
        a text tower, "text_embedding" (S, A, D) of the report's anatomy texts; CT-FM adds
        "patch_embedding" (S, M, D). `ctray embed` and the export's loader call it."""
        raise NotImplementedError

    def compute_dtype(self) -> torch.dtype:
        """The dtype inputs enter the model in: autocast's when the step runs under it (bf16
        training: the first convolution or matmul would cast them anyway, so a float32 copy of the
        batch would only cost memory), else the parameters'."""
        param = next(self.parameters())
        if torch.is_autocast_enabled(param.device.type):
            return torch.get_autocast_dtype(param.device.type)
        return param.dtype

    def begin_step(self, step: int, seed: int) -> None:
        """Called before each micro-step with the optimizer step and a seed derived from
        train.seed and the micro-step, the same on every rank (draws every rank must agree on,
        like CA-GCL's permutations). torch's global generators are already seeded per rank."""

    def clamped_parameters(self) -> list[tuple[nn.Parameter, float, float]]:
        """(parameter, low, high): clamped in place after every optimizer step (a learnable
        temperature), so that the gradient at a bound is never cut."""
        return []

    def advice(self, metrics: dict[str, float]) -> dict[str, str]:
        """Subject -> a warning that a report's metrics call for (rank 0 logs each subject once per
        attempt); none by default."""
        return {}


@runtime_checkable
class Evaluates(Protocol):
    """A task that evaluates itself during training on batches from its own sampler (fixed seed)."""

    def evaluate(self, batches: Iterable[Batch], step: int) -> Evaluation: ...


@runtime_checkable
class EmbedsWith(Protocol):
    """An objective whose embeddings (`ctray embed`, ctray.export.Encoder.sampler) take another
    sampler than training: deterministic, without augmentation (CT-FM: the whole scan as a grid of
    patches). Others embed through their training sampler with a seed per scan."""

    def embed_sampler(self, cfg: Any, assets: Assets) -> Sampler: ...


@dataclass(frozen=True)
class BenchProfile:
    """How `ctray bench step` runs a recipe when given no --config."""

    local_job: str
    """A jobs/ YAML with the recipe's tiny local config (CPU runs start from it)."""
    paper_size: tuple[str, ...] = ()
    """Overrides of that job that build the paper-size model and batch (GPU runs)."""
    target: str = "no target"
    """The throughput target on one GPU, printed beside the figures."""
    paper_job: str = ""
    """The paper's jobs/ YAML: `ctray bench data` samples with its settings (input sizes, organs,
    crops), its text tower's tokenizer trained on the shards instead of a hub download."""
    feed_views_per_s: float = 0.0
    """Views per second one GPU takes at the target: `ctray bench data` sizes the CPU feed to it."""


class Objective(Protocol, Generic[C_contra]):
    """One pretraining recipe, as the registry holds it."""

    @property
    def name(self) -> str:
        """The `objective.name` that selects it."""
        ...

    @property
    def config(self) -> type[RecipeConfig]:
        """Its config section (a RecipeConfig subclass with `name: Literal[...]`)."""
        ...

    @property
    def sweep_space(self) -> SweepSpace:
        """Default `ctray sweep` space: dotted path -> {grid|choice|uniform|loguniform: ...}."""
        ...

    @property
    def bench(self) -> BenchProfile:
        """How `ctray bench step` runs it."""
        ...

    def prepare(self, cfg: C_contra, shards: str, run: RunFolder) -> Assets:
        """Driver side, once before training, with the run's shards (data.shards) and folder:
        the assets every rank's task and the sampler receive (a tokenizer, label ids from the
        manifest, a checked stage-1 export). A config that does not fit its shards raises
        ConfigError here."""
        ...

    def sampler(self, cfg: C_contra, assets: Assets) -> Sampler: ...

    def task(self, cfg: C_contra, assets: Assets) -> Task: ...

    def synthetic_batch(self, cfg: C_contra, scans: int, device: torch.device) -> Batch:
        """An in-memory batch like the sampler's (after tensor conversion), for `data.synthetic`
        and FLOP counting."""
        ...
