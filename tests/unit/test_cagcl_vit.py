"""CA-GCL's ViT as fVLM trains it: started from a 2D ViT (a transformers ViT-MAE folder, timm-named
state dicts, a Hub repository), the anatomy pooling over several blocks' tokens, and dropout.
Every 2D checkpoint here is a tiny random-init one written by the test (nothing is downloaded)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ctray.errors import ConfigError
from ctray.objectives.cagcl.config import CAGCLConfig
from ctray.objectives.cagcl.recipe import check_vit_init
from ctray.objectives.cagcl.vit import AnatomyQueryPooling, ViT3D
from ctray.objectives.cagcl.vit_init import init_vit3d, interpolate_pos_embed

from helpers import export_to, tiny_task, trained_like

WIDTH, DEPTH, HEADS = 32, 2, 2


def mae_folder(tmp_path, width: int = WIDTH, heads: int = HEADS):
    """A random transformers ViTMAEModel (64 x 64 images, patch 16: a 4 x 4 grid) saved with
    save_pretrained; every parameter drawn at random (biases and norms too)."""
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(0)
    config = ViTMAEConfig(
        hidden_size=width,
        num_hidden_layers=DEPTH,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        image_size=64,
        patch_size=16,
        layer_norm_eps=1e-6,  # ViT3D's (and MAE's); transformers' default 1e-12 differs in the 7th digit
    )
    model = ViTMAEModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path / f"mae-{width}-{heads}"
    model.save_pretrained(folder)
    return folder, model


def hf_layers(model) -> list:
    """The model's transformer layers (transformers 5 calls them `layers`, 4 `encoder.layer`)."""
    return list(model.layers) if hasattr(model, "layers") else list(model.encoder.layer)


def test_a_transformers_vit_mae_folder_starts_the_3d_vit(tmp_path):
    folder, mae = mae_folder(tmp_path)
    vit = ViT3D((12, 64, 64), (4, 16, 16), WIDTH, DEPTH, HEADS)  # token grid 3 x 4 x 4: in-plane = MAE's 4 x 4
    patch_before = vit.patch_embed.weight.detach().clone()
    loaded = init_vit3d(vit, str(folder))
    assert (
        "patch_embed.weight" not in loaded and len(loaded) == 1 + 12 * DEPTH + 2
    )  # fVLM: patch embedding from scratch
    assert torch.equal(vit.patch_embed.weight, patch_before)

    # The blocks and the final norm compute what transformers' layers compute: q/k/v order, head split, MLP.
    x = torch.randn(2, 7, WIDTH)
    with torch.no_grad():
        h = x
        for layer in hf_layers(mae):
            out = layer(h)
            h = out[0] if isinstance(out, tuple) else out
        want = mae.layernorm(h)
        got = x
        for block in vit.blocks:
            got = block(got)
        got = vit.norm(got)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(vit.blocks[1].norm1.weight, hf_layers(mae)[1].layernorm_before.weight)
    assert torch.equal(vit.norm.bias, mae.layernorm.bias)

    # Position embedding: the class token's entry dropped, the 4 x 4 grid copied unchanged into every slice.
    plane = mae.embeddings.position_embeddings[0, 1:].reshape(4, 4, WIDTH)
    pos = vit.pos.detach().reshape(3, 4, 4, WIDTH)
    assert all(torch.equal(pos[z], plane) for z in range(3))

    out = vit(torch.randn(1, 1, 12, 64, 64))
    assert out.shape == (1, 48, WIDTH) and torch.isfinite(out).all()


def test_position_grid_resized_in_plane_and_repeated_over_depth():
    """fVLM's blip_pretrain.py: bilinear (align_corners=False) to the in-plane grid, the same plane in
    every slice. Upsampling 4 -> 8 rows and 4 -> 6 columns keeps the corners (they sample the
    source's corners) and a constant stays constant."""
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16, 8)
    out = interpolate_pos_embed(pos, (3, 8, 6)).reshape(3, 8, 6, 8)
    src = pos[0, 1:].reshape(4, 4, 8)
    assert all(torch.equal(out[z], out[0]) for z in range(3))
    assert torch.allclose(out[0, 0, 0], src[0, 0]) and torch.allclose(out[0, -1, -1], src[-1, -1])
    ramp = F.interpolate(src.permute(2, 0, 1)[None], size=(8, 6), mode="bilinear", align_corners=False)
    assert torch.allclose(out[1], ramp[0].permute(1, 2, 0))
    const = interpolate_pos_embed(torch.full((1, 16, 8), 0.5), (2, 5, 7))  # no class token: 16 = 4 x 4
    assert const.shape == (1, 2 * 5 * 7, 8) and torch.allclose(const, torch.full_like(const, 0.5))
    with pytest.raises(ConfigError, match="no square grid"):
        interpolate_pos_embed(torch.zeros(1, 7, 8), (1, 2, 2))


def timm_state(width: int = WIDTH, depth: int = DEPTH) -> dict[str, torch.Tensor]:
    """A random ViT in timm's (and MAE's) names, with the keys MAE's checkpoint also holds."""
    gen = torch.Generator().manual_seed(3)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    state = {
        "cls_token": r(1, 1, width),
        "pos_embed": r(1, 17, width),
        "patch_embed.proj.weight": r(width, 3, 16, 16),
        "patch_embed.proj.bias": r(width),
        "norm.weight": r(width),
        "norm.bias": r(width),
        "mask_token": r(1, 1, width),  # MAE's decoder side: left out
        "decoder_embed.weight": r(16, width),
    }
    for i in range(depth):
        for name, shape in {
            "norm1": (width,),
            "attn.qkv": (3 * width, width),
            "attn.proj": (width, width),
            "norm2": (width,),
            "mlp.fc1": (4 * width, width),
            "mlp.fc2": (width, 4 * width),
        }.items():
            state[f"blocks.{i}.{name}.weight"] = r(*shape)
            state[f"blocks.{i}.{name}.bias"] = r(shape[0])
    return state


def test_timm_state_dicts_load_from_a_pth_a_safetensors_folder_and_the_hub(tmp_path, monkeypatch):
    state = timm_state()
    torch.save({"model": state}, tmp_path / "mae_pretrain_vit_base.pth")  # MAE's release wraps it so
    (tmp_path / "repo").mkdir()
    save_file(state, tmp_path / "repo" / "model.safetensors")
    (tmp_path / "repo" / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224"}))  # timm's

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, name: str(tmp_path / "repo" / name))
    vits = []
    for source in (str(tmp_path / "mae_pretrain_vit_base.pth"), str(tmp_path / "repo"), "timm/tiny-vit.mae"):
        vit = ViT3D((12, 64, 64), (4, 16, 16), WIDTH, DEPTH, HEADS)
        init_vit3d(vit, source)
        vits.append(vit)
    mapping = {"norm1": "norm1", "attn.qkv": "qkv", "attn.proj": "proj", "norm2": "norm2", "mlp.fc1": "mlp.0"}
    for vit in vits:
        ours = vit.state_dict()
        for i in range(DEPTH):
            for theirs, mine in {**mapping, "mlp.fc2": "mlp.2"}.items():
                for kind in ("weight", "bias"):
                    assert torch.equal(ours[f"blocks.{i}.{mine}.{kind}"], state[f"blocks.{i}.{theirs}.{kind}"])
        assert torch.equal(ours["norm.weight"], state["norm.weight"])
        assert torch.equal(ours["pos"].reshape(3, 16, WIDTH)[2], state["pos_embed"][0, 1:])

    def offline(repo_id: str, name: str) -> str:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ConfigError) as e:
        init_vit3d(ViT3D((12, 64, 64), (4, 16, 16), WIDTH, DEPTH, HEADS), "timm/gone")
    assert str(e.value) == "objective.vit_init timm/gone: not a local path, and the Hub did not give it (OSError)"


def test_an_inflated_patch_embedding_gives_the_2d_response_of_a_volume_constant_along_z(tmp_path):
    """I3D: the RGB kernel summed over channels (grey = R = G = B), spread over the patch's 4 slices."""
    state = timm_state()
    save_file(state, tmp_path / "vit.safetensors")
    vit = ViT3D((4, 16, 16), (4, 16, 16), WIDTH, DEPTH, HEADS)
    assert "patch_embed.weight" in init_vit3d(vit, str(tmp_path / "vit.safetensors"), "inflate")
    grey = torch.rand(1, 1, 16, 16)
    want = F.conv2d(
        grey.expand(1, 3, 16, 16), state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16
    )
    got = vit.patch_embed(grey.unsqueeze(2).expand(1, 1, 4, 16, 16))
    torch.testing.assert_close(got[:, :, 0], want, atol=1e-4, rtol=1e-4)


def test_a_checkpoint_that_does_not_fit_fails_in_one_line_naming_the_first_mismatch(tmp_path):
    folder, _ = mae_folder(tmp_path)
    errors = []
    for vit in (
        ViT3D((12, 64, 64), (4, 16, 16), 48, DEPTH, HEADS),  # width
        ViT3D((12, 64, 64), (4, 16, 16), WIDTH, 3, HEADS),  # depth
        ViT3D((12, 64, 64), (4, 16, 16), WIDTH, DEPTH, 4),  # heads
    ):
        with pytest.raises(ConfigError) as e:
            init_vit3d(vit, str(folder))
        errors.append(str(e.value))
    where = f"objective.vit_init {folder}"
    assert errors == [
        f"{where}: pos_embed (1, 17, 32) has width 32, the ViT 48 (objective.width must match)",
        f"{where}: 2 blocks, the ViT 3 (objective.depth must match)",
        f"{where}: 2 attention heads, the ViT 4 (objective.heads must match)",
    ]
    state = timm_state()
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(3 * WIDTH, WIDTH)  # an MLP ratio of 3
    save_file(state, tmp_path / "ratio3.safetensors")
    with pytest.raises(ConfigError) as e:
        init_vit3d(ViT3D((12, 64, 64), (4, 16, 16), WIDTH, DEPTH, HEADS), str(tmp_path / "ratio3.safetensors"))
    assert "\n" not in str(
        e.value
    ) and "blocks.1.mlp.fc1.weight (96, 32) does not fit the ViT's blocks.1.mlp.0.weight" in str(e.value)


def test_the_driver_checks_vit_init_on_a_meta_vit_before_any_worker_starts(tmp_path):
    folder, _ = mae_folder(tmp_path)
    local = dict(input_size=(16, 64, 64), patch=(4, 16, 16), width=WIDTH, depth=DEPTH, heads=HEADS, pool_heads=2)
    check_vit_init(CAGCLConfig(**local, vit_init=str(folder)))
    with pytest.raises(ConfigError, match=r"has width 32, the ViT 64"):
        check_vit_init(CAGCLConfig(**{**local, "width": 64}, vit_init=str(folder)))
    with pytest.raises(ConfigError, match="no such file or folder"):
        check_vit_init(CAGCLConfig(**local, vit_init=str(tmp_path / "absent")))


def test_the_pooling_reads_the_listed_blocks_as_fvlm_concatenates_them():
    torch.manual_seed(0)
    vit = ViT3D((8, 32, 32), (4, 16, 16), 16, 3, 2, out_blocks=[1, 3]).eval()
    pool = AnatomyQueryPooling(anatomies=2, dim=16, heads=4, out_dim=8).eval()
    x = torch.randn(2, 1, 8, 32, 32)
    mask = torch.zeros(2, 2, 8, dtype=torch.bool)
    mask[:, 0, :3] = True
    mask[0, 1, 5:] = True
    feats = vit.features(x)
    assert feats.shape == (2, 2, 8, 16) and torch.equal(feats[:, 1], vit(x))
    with torch.no_grad():
        first = vit.blocks[0](vit.patch_embed(x).flatten(2).transpose(1, 2) + vit.pos)
        assert torch.allclose(feats[:, 0], first)  # block 1's output as it leaves the block, no norm
        out = pool(feats, mask)
        assert out.shape == (2, 2, 8)
        # fVLM's get_roi_features: per scan, the anatomy's tokens of each block concatenated, one attention.
        for b, a in ((0, 0), (1, 0), (0, 1)):
            kv = torch.cat([feats[b, layer][mask[b, a]] for layer in range(2)])[None]
            ref, _ = pool.attn(pool.queries[a][None, None], kv, kv)
            ref = F.normalize(ref[0, 0] @ pool.proj_weight[a] + pool.proj_bias[a], dim=-1)
            torch.testing.assert_close(out[b, a], ref, atol=1e-5, rtol=1e-5)

    # Block 1 reaches the pooled output directly: with block 2's input cut from the graph, its
    # parameters still get a gradient when block 1 is pooled, none when only the last block is.
    for blocks, reaches in (([1, 3], True), ([3], False)):
        torch.manual_seed(0)
        vit = ViT3D((8, 32, 32), (4, 16, 16), 16, 3, 2, out_blocks=blocks)
        vit.blocks[1].register_forward_pre_hook(lambda module, args: (args[0].detach(),))
        pool(vit.features(x), mask).sum().backward()
        grad = vit.blocks[0].qkv.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches, blocks


def test_pool_blocks_must_end_with_the_last_block():
    assert CAGCLConfig(depth=12, pool_blocks=(4, 7, 10, 12)).pool_blocks == (4, 7, 10, 12)
    for bad in ((4, 7, 10), (7, 4, 12), (0, 12), (4, 4, 12)):
        with pytest.raises(ValueError, match="pool_blocks"):
            CAGCLConfig(depth=12, pool_blocks=bad)
    with pytest.raises(ValueError, match="out_blocks"):
        ViT3D((8, 32, 32), (4, 16, 16), 16, 3, 2, out_blocks=[1, 2])


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 32, 32)
    mask = torch.ones(2, 2, 8, dtype=torch.bool)
    plain = ViT3D((8, 32, 32), (4, 16, 16), 16, 2, 2, out_blocks=[1, 2]), AnatomyQueryPooling(2, 16, 4, 8)
    dropped = (
        ViT3D((8, 32, 32), (4, 16, 16), 16, 2, 2, dropout=0.1, out_blocks=[1, 2]),
        AnatomyQueryPooling(2, 16, 4, 8, dropout=0.1),
    )
    for a, b in zip(plain, dropped, strict=True):
        b.load_state_dict(a.state_dict(), strict=True)  # dropout adds no parameter: the same weights

    def run(vit: ViT3D, pool: AnatomyQueryPooling, train: bool) -> torch.Tensor:
        vit.train(train)
        pool.train(train)
        return pool(vit.features(x), mask)

    assert torch.equal(run(*plain, False), run(*dropped, False))
    assert torch.equal(run(*dropped, False), run(*dropped, False))
    assert torch.equal(run(*plain, True), run(*plain, True))  # dropout 0: training is deterministic, as before
    assert not torch.allclose(run(*dropped, True), run(*dropped, True))
    only_pool = plain[0], dropped[1]  # the pooling's attention dropout on its own
    assert not torch.allclose(run(*only_pool, True), run(*only_pool, True))


def test_the_export_carries_the_new_settings_and_loads_without_the_2d_checkpoint(tmp_path):
    """fVLM's settings on the local job's tiny ViT: the export's ViT3D/pooling kwargs hold dropout
    and out_blocks, and load_encoder rebuilds the model from the export alone (the 2D checkpoint
    deleted: the exported weights are the trained ones)."""
    import shutil

    from ctray.export import load_encoder
    from ctray.objectives import get_objective

    folder, _ = mae_folder(tmp_path)
    task, cfg, assets = tiny_task(
        "cagcl",
        f"objective.vit_init={folder}",
        "objective.pool_blocks=[1,2]",
        "objective.vit_dropout=0.1",
        "objective.pool_dropout=0.1",
    )
    pos = task.vit.pos.detach().reshape(4, 4, 4, WIDTH)
    assert torch.equal(pos[3], pos[0])  # started from the 2D checkpoint
    task = trained_like(task)
    export_to(tmp_path / "export", task, cfg, assets)
    shutil.rmtree(folder)
    meta = json.loads((tmp_path / "export" / "export.json").read_text())
    assert (
        meta["parts"]["vision"]["kwargs"] | {"dropout": 0.1, "out_blocks": [1, 2]} == meta["parts"]["vision"]["kwargs"]
    )
    assert meta["parts"]["anatomy_pooling"]["kwargs"]["dropout"] == 0.1
    encoder = load_encoder(str(tmp_path / "export"))
    assert encoder.config.vit_init is None and encoder.module.out_blocks == (1, 2)
    batch = get_objective("cagcl").synthetic_batch(cfg.objective, 2, torch.device("cpu"))
    expected = task.embed(batch)
    got = encoder.embed(batch)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
