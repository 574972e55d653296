"""Contrastive losses across workers: 2 CPU processes (torch.distributed, gloo) each hold half of a
batch, gather the embeddings with autograd (ctray.dist, as the TotalFM and CA-GCL tasks do), and
compute the loss on the gathered batch; after the gradient all-reduce that DeepSpeed performs, loss
and parameter gradients must equal one process computing the full batch."""

import os

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import free_port

B, A, D_IN, D = 8, 3, 6, 5


def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, A, D_IN, generator=g, dtype=torch.float64)
    y = torch.randn(B, A, D_IN, generator=g, dtype=torch.float64)
    present = torch.rand(B, A, generator=g) < 0.8
    return x, y, present


def towers():
    g = torch.Generator().manual_seed(1)
    return torch.randn(D_IN, D, generator=g, dtype=torch.float64), torch.randn(
        D_IN, D, generator=g, dtype=torch.float64
    )


def loss_and_grads(x, y, present):
    """The CA-GCL loss (eq. 5 with lambda 0.1) of a "model" made of two linear towers."""
    from ctray import dist
    from ctray.objectives.losses import AnatomyLocalLoss, CrossAnatomyGlobalLoss

    w_img, w_txt = (t.requires_grad_(True) for t in towers())
    v = dist.gather_with_grad(F.normalize(x @ w_img, dim=-1))
    r = dist.gather_with_grad(F.normalize(y @ w_txt, dim=-1))
    p = dist.gather(present)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    gen = torch.Generator().manual_seed(42)  # the same permutations on every worker
    loss = AnatomyLocalLoss()(v, r, p, scale).sum() + 0.1 * CrossAnatomyGlobalLoss()(v, r, p, scale, gen)
    loss.backward()
    return loss.detach(), w_img.grad, w_txt.grad


def _worker(rank, world, port, out):
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    x, y, present = batch()
    half = slice(rank * B // world, (rank + 1) * B // world)
    loss, g_img, g_txt = loss_and_grads(x[half], y[half], present[half])
    for g in (g_img, g_txt):  # DeepSpeed / DDP average gradients over workers
        tdist.all_reduce(g)
        g /= world
    torch.save({"loss": loss, "g_img": g_img, "g_txt": g_txt}, os.path.join(out, f"rank{rank}.pt"))
    tdist.barrier()
    tdist.destroy_process_group()
    # Skip interpreter teardown: under load, gloo's threads have aborted it ("terminate called
    # without an active exception") after the results were written.
    os._exit(0)


def test_two_workers_match_single_process_full_batch(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    loss, g_img, g_txt = loss_and_grads(*batch())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["loss"], loss, rtol=1e-10)
        assert torch.allclose(got["g_img"], g_img, rtol=1e-8, atol=1e-12)
        assert torch.allclose(got["g_txt"], g_txt, rtol=1e-8, atol=1e-12)
    assert g_img.abs().sum() > 0
