"""The batch path to the device and the step on it: the training step of CT-FM and TotalFM stage 1
asks the device for no value (counted on CPU, and with torch's own sync check on a GPU), those of
TotalFM stage 2 and CA-GCL only in their text tower, TotalFM's
index-based VideoMAE loss equals transformers' boolean-mask one, the DevicePrefetcher's order, the
DeepSpeed settings for ZeRO 1-2 and the optimizer, and the FLOPs, TFLOP/s, MFU and memory a report
carries.

On CPU a tensor's data is on the host, so nothing there waits for a device. What would wait on a
GPU is counted instead, at the two levels a read can happen: ATen ops that need a device value on
the host (`_local_scalar_dense` behind `.item()`, `float(t)`, `if t:`; `nonzero`, `masked_select`,
`unique`, boolean indexing, `repeat_interleave` without an output size, `equal`, `bincount`) and
the Python calls that copy data out (`tolist`, `numpy`, `cpu`) or in (`torch.tensor(data,
device=...)`). A host tensor copied to the device by `.to()` inside the step is invisible on CPU
(the VideoMAE position tables were one: `test_videomae_position_tables_move_with_the_model`); the
GPU test with torch's own sync check sees those too."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ctray.objectives import get_objective
from ctray.train.loop import DevicePrefetcher, device_batch

from helpers import tiny_task

aten = torch.ops.aten
CPU = torch.device("cpu")

SYNCING_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.bincount.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
"""ATen ops whose CUDA kernel reads a device value back to the host."""

INDEXING = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)
"""ATen ops that sync when an index is a boolean mask (they call nonzero in the kernel)."""

COPYING_OUT = {"tolist", "numpy", "cpu"}
"""Tensor methods that copy data to the host (on CPU tensors, unseen by ATen)."""

FROM_HOST_DATA = {"tensor", "as_tensor"}
"""Factories that, given a device, copy host data to it: blocking on a GPU (`torch.tensor(x,
device="cuda")` waits for its copy). Without a device they make a host tensor, which is fine."""


def _where() -> str:
    """The innermost frames in ctray, transformers or this file that led here."""
    frames = [f for f in traceback.extract_stack()[:-3] if "/ctray/" in f.filename or "transformers/" in f.filename]
    where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
    return where or "(no frame of ctray or transformers: a backward kernel, or another library)"


class HostSyncs:
    """A context that records every read of a tensor's value to the host (see the module docstring):
    `syncs` holds (what, where) pairs."""

    def __init__(self) -> None:
        self.syncs: list[tuple[str, str]] = []
        outer = self

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if outer._syncs(func, args, kwargs):
                    outer.syncs.append((str(func), _where()))
                return func(*args, **kwargs)

        class Methods(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in COPYING_OUT:
                    outer.syncs.append((f"Tensor.{name}", _where()))
                elif name in FROM_HOST_DATA and (kwargs or {}).get("device") is not None:
                    outer.syncs.append((f"torch.{name}(..., device=)", _where()))
                return func(*args, **(kwargs or {}))

        self.modes = [Methods(), Ops()]

    @staticmethod
    def _syncs(func, args, kwargs) -> bool:
        if func in SYNCING_OPS:
            return True
        if func.overloadpacket in INDEXING:
            indices = args[1] if len(args) > 1 else ()
            return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
        if func.overloadpacket is aten.repeat_interleave:
            return isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None and len(args) < 4
        return False

    def __enter__(self) -> HostSyncs:
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self.modes):
            mode.__exit__(*exc)


def test_the_counter_sees_every_kind_of_read():
    """What the step tests rely on: each way a step can read the device is counted."""
    x = torch.tensor([0.5, 0.0, 2.0], requires_grad=True)
    with HostSyncs() as h:
        x.detach().sum().item()
        float(x.detach().max())
        if x.sum() > 0:
            pass
        x.nonzero()
        y = x[x > 0]
        y.sum().backward()  # boolean indexing's backward scatters back: counted too
        x.tolist()
        x.detach().numpy()
        torch.repeat_interleave(torch.tensor([1, 2]))
        x.detach().unique()
        torch.tensor([1.0, 2.0], device=x.device)
    kinds = [what for what, _ in h.syncs]
    assert kinds.count("aten._local_scalar_dense.default") == 3
    assert {"aten.nonzero.default", "aten.index.Tensor", "Tensor.tolist", "Tensor.numpy"} <= set(kinds)
    assert "aten.repeat_interleave.Tensor" in kinds and any("unique" in k for k in kinds)
    assert "torch.tensor(..., device=)" in kinds
    with HostSyncs() as h:  # and what needs no read is not
        z = x * 2 + x.sum()
        z.index_select(0, torch.tensor([0, 2])).sum().backward()
        torch.where(x > 0, x, 0.0).argsort()
        torch.tensor(3.0)  # a host scalar
    assert h.syncs == []


def _step_batch(name: str, task, cfg) -> dict[str, torch.Tensor]:
    """A synthetic batch as the loop's DevicePrefetcher hands it to the step (with the task's host
    fields); TotalFM's with organs missing in some scans, as real scans are."""
    host = get_objective(name).synthetic_batch(cfg.objective, 3, CPU)
    if "present" in host:
        host["present"][0, 1:] = 0
        host["present"][2, 0] = 0
    return device_batch(task, host, CPU)


def _syncs_of_a_step(name: str) -> list[tuple[str, str]]:
    """The reads of one forward + backward of the task, after a warm-up step (first-call work such
    as lazy initialisation is not the step's)."""
    task, cfg, _ = tiny_task(name)
    task.begin_step(0, 0)
    batch = _step_batch(name, task, cfg)
    task(batch)["loss"].backward()
    with HostSyncs() as h:
        task(batch)["loss"].backward()
    return h.syncs


@pytest.mark.parametrize("name", ["ctfm_simclr", "totalfm_mae"])
def test_the_training_step_asks_the_device_for_nothing(name):
    syncs = _syncs_of_a_step(name)
    assert syncs == [], "\n".join(f"{what} at {where}" for what, where in syncs)


TEXT_TOWER_READS = {"totalfm_clip": ("masking_utils.py",), "cagcl": ("anatomy_text.py", "masking_utils.py")}
"""Where the steps of TotalFM stage 2 and CA-GCL still read the device, in their shared text
tower: transformers' masking_utils (whether BERT's padding mask is all ones); for CA-GCL also
anatomy_text.py, the present slots of the report mask (only their texts go through BERT), which
its device decides (region & has_text) where TotalFM's come from the host (Task.host_fields).
Their losses read nothing (masked per anatomy and per group: losses.masked_infonce)."""


@pytest.mark.parametrize("name", sorted(TEXT_TOWER_READS))
def test_the_text_recipes_read_the_device_only_in_their_text_tower(name):
    syncs = _syncs_of_a_step(name)
    assert syncs, "no read left: TEXT_TOWER_READS and this test can go; test the step with the others"
    outside = [(what, where) for what, where in syncs if not any(f in where for f in TEXT_TOWER_READS[name])]
    assert outside == [], "\n".join(f"{what} at {where}" for what, where in outside)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's sync check needs a CUDA device")
@pytest.mark.parametrize("name", ["ctfm_simclr", "totalfm_mae"])
def test_the_training_step_passes_torchs_sync_check_on_a_gpu(name):
    """torch.cuda.set_sync_debug_mode("error") raises at any synchronising CUDA call."""
    device = torch.device("cuda")
    task, cfg, _ = tiny_task(name)
    task.to(device)
    host = get_objective(name).synthetic_batch(cfg.objective, 3, CPU)
    batch = device_batch(task, host, device)
    task(batch)["loss"].backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", torch.bfloat16):
            out = task(batch)
        out["loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- TotalFM stage 1: VideoMAE's loss by indices -------------------------------------------------


def _old_tube_mask(n, cfg, organs, ratio, device):
    """ctray's tube masking before this change (commit 04da4a0), as transformers' boolean mask."""
    t, h, _ = organs.size
    spatial = (h // cfg.patch_size) ** 2
    masked = min(spatial - 1, round(ratio * spatial))
    order = torch.rand(n, spatial, device=device).argsort(1)
    mask = torch.zeros(n, spatial, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :masked], True)
    return mask.repeat(1, t // cfg.tubelet_size)


def test_videomae_loss_by_indices_equals_transformers_boolean_masks_on_the_same_draws():
    from ctray.objectives.totalfm.mae import tube_masking, videomae_loss

    task, cfg, _ = tiny_task("totalfm_mae")
    mae, o = task.mae.eval(), cfg.objective
    x = torch.rand(5, o.organs.size[0], 1, *o.organs.size[1:], generator=torch.Generator().manual_seed(0))
    tokens = mae.videomae.embeddings.num_patches
    torch.manual_seed(3)
    mask = tube_masking(5, o.model, o.organs, o.mask_ratio, CPU)
    torch.manual_seed(3)
    assert torch.equal(mask.as_bool(tokens), _old_tube_mask(5, o.model, o.organs, o.mask_ratio, CPU))
    assert (mask.masked.diff(dim=1) > 0).all() and (mask.visible.diff(dim=1) > 0).all()  # ascending, as masks keep
    ours = videomae_loss(mae, x, mask)
    ours.backward()
    grads = [p.grad.clone() for p in mae.parameters()]
    mae.zero_grad()
    theirs = mae(pixel_values=x, bool_masked_pos=mask.as_bool(tokens)).loss
    theirs.backward()
    assert torch.equal(ours, theirs)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, mae.parameters(), strict=True))


@pytest.mark.parametrize("name", ["totalfm_mae", "totalfm_clip"])
def test_videomae_position_tables_move_with_the_model(name):
    """transformers keeps them as plain attributes, left on the CPU by `.to(device)` (each forward
    then copied them to the GPU, blocking): as buffers they follow the model, outside its state dict."""
    task, _, _ = tiny_task(name)
    state = set(task.state_dict())
    task.to(torch.float64)
    tables = [(n, b) for n, b in task.named_buffers() if n.endswith("position_embeddings")]
    assert len(tables) == (2 if name == "totalfm_mae" else 1)  # stage 1: the encoder's and the decoder's
    assert all(b.dtype == torch.float64 for _, b in tables) and not state & {n for n, _ in tables}


@pytest.mark.parametrize("name", ["totalfm_mae", "totalfm_clip"])
def test_totalfm_step_with_host_slots_equals_the_step_without(name):
    """The host fields change where the organ count is computed, not the step: the same loss as a
    batch without them (slots found on the device), with organs missing and with none at all."""
    task, cfg, _ = tiny_task(name)
    task.eval()  # no dropout: two forwards are comparable
    for empty in (False, True):
        host = get_objective(name).synthetic_batch(cfg.objective, 3, CPU)
        host["present"][0, 1:] = 0
        if empty:
            host["present"][:] = 0
        prepared = device_batch(task, host, CPU)
        assert prepared["present_slots"].tolist() == host["present"].flatten().nonzero().squeeze(1).tolist()
        task.begin_step(0, 0)
        torch.manual_seed(1)
        with_slots = task(prepared)
        torch.manual_seed(1)
        without = task(host)
        assert torch.equal(with_slots["loss"], without["loss"]) and with_slots["views"] == without["views"]
        if empty and name == "totalfm_mae":
            assert with_slots["views"] == 0 and with_slots["loss"] == 0


# --- the DevicePrefetcher -----------------------------------------------------------------------


class _Task(torch.nn.Module):
    def host_fields(self, batch):
        return {"total": batch["x"].sum(0, keepdim=True)}


def test_the_prefetcher_hands_over_every_batch_in_order_with_the_next_one_already_taken():
    taken: list[int] = []

    def source() -> Iterator[dict[str, torch.Tensor]]:
        for i in range(4):
            taken.append(i)
            yield {"x": torch.full((2,), float(i))}

    seen = []
    for batch in DevicePrefetcher(source(), _Task(), CPU, pin=True):  # pin: a no-op on a CPU device
        # batch i is handed over once batch i + 1's copy is queued (the last has none after it)
        assert taken == list(range(min(len(seen) + 2, 4)))
        seen.append((batch["x"].tolist(), batch["total"].tolist()))
    assert seen == [([float(i)] * 2, [2.0 * i]) for i in range(4)]
    assert list(DevicePrefetcher(iter([]), _Task(), CPU)) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_prefetcher_copies_pinned_batches_on_its_own_stream():
    device = torch.device("cuda")
    host = [{"x": torch.randn(1 << 20)} for _ in range(3)]
    copies = []
    for batch in DevicePrefetcher(iter(host), _Task(), device, pin=True):
        x = batch["x"]
        assert x.is_cuda
        # the step's work on the default stream sees the finished copy
        copies.append((x * 1.0).cpu())
        torch.cuda._sleep(1_000_000)  # a long step, during which the next copy runs
    assert all(torch.equal(c, h["x"]) for c, h in zip(copies, host, strict=True))


# --- engine settings ----------------------------------------------------------------------------


def test_zero_1_and_2_overlap_the_reduction_in_buckets_and_adamw_fuses_on_cuda_only():
    from ctray.config import load_config
    from ctray.train.config import PretrainConfig
    from ctray.train.engine import adamw, deepspeed_config

    from helpers import TINY

    for stage in (0, 1, 2, 3):
        cfg = load_config(PretrainConfig, None, [*TINY, "data.shards=unused", f"deepspeed.zero_stage={stage}"])
        zero = deepspeed_config(cfg, use_gpu=False)["zero_optimization"]
        if stage in (1, 2):
            assert zero == {
                "stage": stage,
                "overlap_comm": True,
                "reduce_bucket_size": 25_000_000,
                "allgather_bucket_size": 25_000_000,
            }
        else:  # ZeRO 3 overlaps by default and buckets by its own settings
            assert zero == {"stage": stage}
    task, cfg, _ = tiny_task("ctfm_simclr")
    assert not adamw(task, cfg).defaults["fused"]  # CPU parameters: torch's default (foreach) update
    if torch.cuda.is_available():
        assert adamw(task.cuda(), cfg).defaults["fused"]


def test_cuda_settings_benchmark_convolutions_and_allow_tf32():
    from ctray.train.engine import cuda_settings

    flags = (torch.backends.cudnn, "benchmark"), (torch.backends.cuda.matmul, "allow_tf32")
    before = [getattr(o, k) for o, k in flags]
    try:
        cuda_settings()
        assert all(getattr(o, k) is True for o, k in flags)
    finally:
        for (o, k), v in zip(flags, before, strict=True):
            setattr(o, k, v)


# --- FLOPs, TFLOP/s, MFU, memory ----------------------------------------------------------------


def test_flops_per_view_leaves_the_task_and_the_random_streams_as_they_were():
    from torch.utils.flop_counter import FlopCounterMode

    from ctray.train.metrics import flops_per_view

    task, cfg, _ = tiny_task("ctfm_simclr")
    batch = device_batch(task, get_objective("ctfm_simclr").synthetic_batch(cfg.objective, 1, CPU), CPU)
    state = {k: v.clone() for k, v in task.state_dict().items()}
    torch.manual_seed(4)
    fpv = flops_per_view(task, batch)
    after = torch.rand(3)
    torch.manual_seed(4)
    assert torch.equal(after, torch.rand(3))  # the global generator is where it was
    assert all(torch.equal(v, task.state_dict()[k]) for k, v in state.items())  # BatchNorm statistics too
    assert all(p.grad is None for p in task.parameters())
    with FlopCounterMode(display=False) as counter:
        out = task(batch)
        out["loss"].backward()
    assert fpv == counter.get_total_flops() / float(out["views"]) > 0
    # the count depends on shapes only: the smoothing runs on every view, so no draw changes it
    assert flops_per_view(task, batch) == fpv


def test_a_report_has_tflops_mfu_and_memory_where_the_device_has_them(monkeypatch):
    from ctray.train.metrics import MetricsWindow, peak_flops, step_line

    window = MetricsWindow(flops_per_view=2e9, peak_flops=1e12)
    for _ in range(2):
        window.add({"loss": torch.tensor(1.0), "views": torch.tensor(50.0)}, wait_s=0.0, step_s=0.5)
    out = window.report(CPU)
    assert out["views_per_s"] == 100.0 and out["tflops_per_worker"] == pytest.approx(0.2)
    assert out["mfu"] == pytest.approx(0.2) and out["peak_memory_gib"] is None  # CPU: no device memory
    plain = MetricsWindow()  # no FLOPs counted: neither figure
    plain.add({"loss": torch.tensor(1.0), "views": torch.tensor(1.0)}, wait_s=0.0, step_s=1.0)
    assert {k: v for k, v in plain.report(CPU).items() if k in ("tflops_per_worker", "mfu")} == {
        "tflops_per_worker": None,
        "mfu": None,
    }

    names = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H100 NVL": 835e12,
        "NVIDIA H200": 989e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100 80GB PCIe": 312e12,
        "NVIDIA L4": None,
    }
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(torch.device("cuda", 0), bf16=True) == peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda", 0), bf16=False) == 989e12 / 2  # fp32 runs: TF32's peak
    assert peak_flops(CPU, bf16=True) is None

    metrics = {"loss": 1.0, "lr": 1e-4, "views_per_s": 312.44, "data_wait_fraction": 0.031}
    full = {**metrics, "tflops_per_worker": 194.12, "mfu": 0.1963, "peak_memory_gib": 42.06}
    assert step_line(40, 200, full, None) == (
        "step 40/200  loss 1.0000  lr 1.0e-04  312.4 views/s  194 TFLOP/s/worker  MFU 19.6%  peak 42.1 GiB"
        "  data-wait 3.1%  eta ?"
    )
    cpu = {**metrics, "tflops_per_worker": 0.00312, "mfu": None, "peak_memory_gib": None}
    assert step_line(40, 200, cpu, None) == (
        "step 40/200  loss 1.0000  lr 1.0e-04  312.4 views/s  0.00312 TFLOP/s/worker  data-wait 3.1%  eta ?"
    )
