"""Adding an objective: a toy fourth recipe (quoted in the README's "Add an objective"), registered
from outside the package, then seen by the config loader and the CLI, sampling real shard rows and
training."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pytest
import torch
from torch import nn

from ctray import objectives
from ctray.cli import build_parser
from ctray.config import StorageConfig, load_config
from ctray.data.pipeline import ScanOrder, ShardRowReader
from ctray.data.samplers import volumes, window01
from ctray.errors import ConfigError
from ctray.ingest.shardset import ShardSet
from ctray.objectives.spec import Assets, BenchProfile, RecipeConfig, Sampler, Task
from ctray.run_folder import RunFolder
from ctray.train.config import PretrainConfig

# --- the toy recipe ---


class ToyConfig(RecipeConfig):
    """Predict each scan's mean intensity from a small copy of it."""

    name: Literal["toy_mean"] = "toy_mean"
    size: tuple[int, int, int] = (8, 16, 16)
    """Voxels (z, y, x) of the copy the model sees (nearest-neighbour grid over the whole scan)."""
    window_hu: tuple[float, float] = (-1024.0, 2048.0)
    """HU range mapped to 0..1 (clipped)."""


class ToySampler:
    """CPU side, numpy only: shard rows -> {"volume": float16 (scans, *size)} in [0, 1]."""

    columns = ("volume", "shape")

    def __init__(self, cfg: ToyConfig):
        self.size, self.window = cfg.size, cfg.window_hu

    def __call__(self, batch: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        # no random draws here; a recipe that crops or drops at random draws from `rng` alone
        return {"volume": np.stack([window01(self.resize(vol), *self.window) for vol in volumes(batch)])}

    def resize(self, vol: np.ndarray) -> np.ndarray:
        """Nearest neighbour: `size` evenly spaced voxels along each axis of the whole scan."""
        return vol[
            np.ix_(*(np.linspace(0, s - 1, n).round().astype(int) for s, n in zip(vol.shape, self.size, strict=True)))
        ]


class ToyTask(Task):
    """Device side: a strided conv, mean pooling and a linear layer regress the scan's mean (MSE)."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv3d(1, 4, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(4, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["volume"].to(self.head.weight.dtype).unsqueeze(1)
        pred = self.head(torch.relu(self.conv(x)).mean(dim=(2, 3, 4))).squeeze(1)
        loss = nn.functional.mse_loss(pred, x.mean(dim=(1, 2, 3, 4)))
        return {"loss": loss, "views": torch.tensor(float(len(x)))}

    def export_config(self) -> dict[str, Any]:
        return {"architecture": f"{__name__}.ToyTask", "kwargs": self.cfg.model_dump(mode="json")}


class ToyMean:
    name = "toy_mean"
    config = ToyConfig
    sweep_space: ClassVar = {"optim.lr": {"loguniform": (1e-4, 1e-2)}}
    bench = BenchProfile("ctfm-local.yaml")

    def prepare(self, cfg: ToyConfig, shards: str, run: RunFolder) -> Assets:
        return Assets()

    def sampler(self, cfg: ToyConfig, assets: Assets) -> ToySampler:
        return ToySampler(cfg)

    def task(self, cfg: ToyConfig, assets: Assets) -> ToyTask:
        return ToyTask(cfg)

    def synthetic_batch(self, cfg: ToyConfig, scans: int, device: torch.device) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return {"volume": torch.rand((scans, *cfg.size), generator=gen).to(torch.float16).to(device)}


# --- the tests ---


@pytest.fixture
def toy():
    """ToyMean registered for one test, then removed: the registry is process-wide."""
    yield objectives.register(ToyMean())
    objectives._LOADED.pop("toy_mean", None)


def toy_cfg(*overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, ["objective.name=toy_mean", "data.shards=unused", *overrides])


def test_a_registered_objective_is_configured_by_name(toy):
    cfg = toy_cfg("objective.size=[4,8,8]")
    assert type(cfg.objective) is ToyConfig and cfg.objective.size == (4, 8, 8)
    assert objectives.get_objective("toy_mean") is toy
    # what Ray Train's workers receive: the config as JSON, validated again on the other side
    again = PretrainConfig.model_validate(cfg.model_dump(mode="json"))
    assert type(again.objective) is ToyConfig and again.objective == cfg.objective
    with pytest.raises(ConfigError, match=r"objective\.sizes: unknown key; did you mean objective\.size\?"):
        toy_cfg("objective.sizes=[4,8,8]")
    known = "known: cagcl, ctfm_simclr, totalfm_clip, totalfm_mae, toy_mean$"
    with pytest.raises(ConfigError, match=f"objective: .*unknown objective 'toy_meen'; {known}"):
        load_config(PretrainConfig, None, ["objective.name=toy_meen", "data.shards=unused"])


def test_the_cli_offers_a_registered_objective(toy):
    assert "toy_mean" in objectives.objective_names()
    assert build_parser().parse_args(["bench", "step", "--objective", "toy_mean"]).objective == "toy_mean"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "step", "--objective", "toy_meen"])


def test_a_name_registers_once(toy):
    with pytest.raises(ValueError, match="'toy_mean' registered twice"):
        objectives.register(ToyMean())
    builtin = ToyMean()
    builtin.name = "ctfm_simclr"
    with pytest.raises(ValueError, match="'ctfm_simclr' registered twice"):
        objectives.register(builtin)
    renamed = ToyMean()
    renamed.name = "toy_other"  # its config's name still defaults to toy_mean
    with pytest.raises(ValueError, match="its config's name defaults to 'toy_mean'"):
        objectives.register(renamed)
    assert "toy_other" not in objectives.objective_names()


def test_the_toy_samples_shard_rows_and_its_task_trains_on_them(toy, train_shards):
    cfg = toy_cfg().objective
    sampler = toy.sampler(cfg, Assets())
    assert isinstance(sampler, Sampler)
    order = ScanOrder(ShardSet.open(str(train_shards), StorageConfig()).scans(), seed=None)  # manifest order
    out = ShardRowReader(str(train_shards), StorageConfig(), sampler, order, seed=0)({"id": np.arange(3)})
    vol = out["volume"]
    assert vol.shape == (3, 8, 16, 16) and vol.dtype == np.float16
    assert 0 <= vol.min() < vol.max() <= 1  # windowed, and not a constant
    assert not np.array_equal(vol[0], vol[1])  # one copy per scan

    torch.manual_seed(0)
    task = toy.task(cfg, Assets())
    result = task({k: torch.as_tensor(v) for k, v in out.items()})
    assert torch.isfinite(result["loss"]) and float(result["views"]) == 3
    result["loss"].backward()
    grads = [p.grad for p in task.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert task.export_config()["kwargs"]["size"] == [8, 16, 16]


def test_a_few_sgd_steps_lower_the_toy_loss(toy):
    cfg = toy_cfg().objective
    torch.manual_seed(0)
    task = toy.task(cfg, Assets())
    batch = toy.synthetic_batch(cfg, 4, torch.device("cpu"))
    opt = torch.optim.SGD(task.parameters(), lr=0.5)
    losses = []
    for _ in range(10):
        loss = task(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses


def test_an_unregistered_name_is_a_config_error_listing_the_known_ones():
    assert "toy_mean" not in objectives.objective_names()  # the fixture removed it after the tests above
    known = "known: cagcl, ctfm_simclr, totalfm_clip, totalfm_mae$"
    with pytest.raises(ConfigError, match=f"objective: .*unknown objective 'toy_mean'; {known}"):
        toy_cfg()
