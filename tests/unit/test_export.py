"""Exports load into the libraries' own classes (strict) and reproduce the training-time
embedding exactly; `ctray.load_encoder` rebuilds the recipe from the export alone."""

import importlib
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import ctray
from ctray.errors import ConfigError
from ctray.export import load_encoder
from ctray.objectives import get_objective

from helpers import LOCAL_JOBS, export_to, tiny_task, trained_like


def library_module(folder, part: dict) -> torch.nn.Module:
    """A part loaded as a user would, without ctray: transformers' from_pretrained, or the named
    class built from its kwargs with a strict state-dict load."""
    if part["class"].startswith("transformers."):
        import transformers

        model, info = getattr(transformers, part["class"].split(".")[-1]).from_pretrained(
            folder / part["folder"], **part["kwargs"], output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        return model.eval()
    module_name, _, attr = part["class"].rpartition(".")
    module = getattr(importlib.import_module(module_name), attr)(**part["kwargs"])
    module.load_state_dict(load_file(folder / part["folder"] / "model.safetensors"), strict=True)
    return module.eval()


@pytest.mark.parametrize("name", sorted(LOCAL_JOBS))
def test_export_loads_strict_and_reproduces_the_training_time_embedding(name, tmp_path):
    task, cfg, assets = tiny_task(name)
    task = trained_like(task)
    batch = get_objective(name).synthetic_batch(cfg.objective, 3, torch.device("cpu"))
    if "region" in batch:  # one anatomy missing from one scan: its embedding must stay out of the scan's
        batch["region"][0, 0] = 0
        batch["present"][0, 0] = 0
    if "labels" in batch:  # the same for CA-GCL, whose regions the device reads from the label map
        first = torch.tensor(assets.anatomy_labels[cfg.objective.anatomies[0]], dtype=torch.uint8)
        batch["labels"][0][torch.isin(batch["labels"][0], first)] = 0
    names = export_to(tmp_path, task, cfg, assets)
    meta = json.loads((tmp_path / "export.json").read_text())
    assert meta["objective"] == name and meta["step"] == 7 and "export.json" in names
    assert meta["versions"]["ctray"] == ctray.__version__ and meta["versions"]["torch"] == torch.__version__
    card = (tmp_path / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "ctray" and name in front["tags"] and "README.md" in names
    assert all(f"`{part}`" in card for part in meta["parts"]) and "synthetic batches only" in card

    expected = task.embed(batch)
    encoder = load_encoder(str(tmp_path))
    got = encoder.embed(batch)
    assert got.keys() == expected.keys() and "embedding" in got
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert encoder.module is encoder.task.export_parts()[meta["vision_part"]].module

    # Each part, loaded with its own library's class, holds exactly the trained weights.
    for part_name, part in task.export_parts().items():
        loaded = library_module(tmp_path, meta["parts"][part_name])
        ours, theirs = part.module.state_dict(), loaded.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part_name

    if name == "ctfm_simclr":  # MONAI's SegResEncoder alone gives the exported embedding
        from ctray.objectives.ctfm.augment import window

        seg = library_module(tmp_path, meta["parts"]["encoder"])
        x = window(batch["patches"], *cfg.objective.window_hu).reshape(-1, 1, *batch["patches"].shape[2:])
        pooled = seg(x)[-1].mean(dim=(2, 3, 4)).reshape(3, cfg.objective.patches_per_scan, -1)
        assert torch.equal(pooled, expected["patch_embedding"])
        assert meta["parts"]["encoder"]["class"] == "monai.networks.nets.segresnet_ds.SegResEncoder"
    if name in ("totalfm_clip", "cagcl"):
        from transformers import AutoTokenizer

        assert encoder.temperature == pytest.approx(0.0234)
        texts = ["the liver is normal", "no lesion in the liver"]
        assert torch.equal(encoder.embed_texts(texts), task.embed_texts(texts))
        ids, _ = task.encoding.encode(texts)
        hf = AutoTokenizer.from_pretrained(tmp_path / "text")(
            texts, padding="max_length", truncation=True, max_length=cfg.objective.text.max_length
        )
        assert hf["input_ids"] == ids.tolist()
        assert torch.equal(expected["anatomy_embedding"][0, 0], torch.zeros_like(expected["anatomy_embedding"][0, 0]))
    else:
        with pytest.raises(ConfigError, match="no text tower"):
            encoder.embed_texts(["x"])


def test_every_other_part_loads_through_huggingface_hubs_mixin(tmp_path):
    """Non-transformers parts are PyTorchModelHubMixin folders: the library class with the mixin
    mixed in loads each (config.json as its kwargs, model.safetensors strictly), equal tensor for tensor."""
    from huggingface_hub import PyTorchModelHubMixin

    task, cfg, assets = tiny_task("cagcl")
    export_to(tmp_path, trained_like(task), cfg, assets)
    meta = json.loads((tmp_path / "export.json").read_text())
    plain = {n: p for n, p in meta["parts"].items() if not p["class"].startswith("transformers.")}
    assert {"vision", "anatomy_pooling", "text_proj"} <= set(plain)
    for name, part in plain.items():
        module_name, _, attr = part["class"].rpartition(".")
        hub = type(f"Hub{attr}", (getattr(importlib.import_module(module_name), attr), PyTorchModelHubMixin), {})
        loaded = hub.from_pretrained(tmp_path / name)
        want = task.export_parts()[name].module.state_dict()
        got = loaded.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k].float(), want[k].float()) for k in want), name


def test_an_export_loads_by_hub_id(tmp_path, monkeypatch):
    """`org/name` that is no local folder comes from the Hub. The download is mocked (no network
    here): snapshot_download hands back a local copy of an export, as it would after downloading."""
    import huggingface_hub

    task, cfg, assets = tiny_task("ctfm_simclr")
    export_to(tmp_path / "snapshot", trained_like(task), cfg, assets)
    asked = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo_id: asked.append(repo_id) or str(tmp_path / "snapshot")
    )
    monkeypatch.chdir(tmp_path)
    encoder = load_encoder("ctray-org/ctfm-tiny")
    assert asked == ["ctray-org/ctfm-tiny"] and encoder.objective == "ctfm_simclr"

    def offline(repo_id: str) -> str:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(
        ConfigError, match=r"^ctray-org/gone: not a local folder, and the Hub did not give it \(OSError\)$"
    ):
        load_encoder("ctray-org/gone")


def test_a_format_1_export_still_loads(tmp_path):
    """Format 1 kept each non-transformers part as <part>.safetensors: rewritten so, it loads the same."""
    task, cfg, assets = tiny_task("ctfm_simclr")
    export_to(tmp_path, trained_like(task), cfg, assets)
    meta = json.loads((tmp_path / "export.json").read_text())
    for name, part in meta["parts"].items():
        (tmp_path / name / "model.safetensors").rename(tmp_path / f"{name}.safetensors")
        meta["parts"][name] = {"file": f"{name}.safetensors", "class": part["class"], "kwargs": part["kwargs"]}
    (tmp_path / "export.json").write_text(json.dumps({**meta, "format": 1}))
    encoder = load_encoder(str(tmp_path))
    want = task.export_parts()["encoder"].module.state_dict()
    got = encoder.module.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_not_an_export_and_a_stage1_of_another_objective_fail_in_one_line(tmp_path):
    from ctray.config import StorageConfig
    from ctray.objectives.totalfm.clip import check_stage1

    with pytest.raises(ConfigError, match="not a ctray export"):
        load_encoder(str(tmp_path))
    task, cfg, assets = tiny_task("ctfm_simclr")
    export_to(tmp_path / "ctfm" / "export", task, cfg, assets)
    _, clip, _ = tiny_task("totalfm_clip", f"objective.init_from={tmp_path / 'ctfm'}")
    with pytest.raises(ConfigError, match="is a ctfm_simclr export, not a VideoMAE stage 1") as err:
        check_stage1(clip.objective, StorageConfig())
    assert "\n" not in str(err.value)
    meta = json.loads((tmp_path / "ctfm" / "export" / "export.json").read_text())
    # A later ctray's recipe field: one line naming the versions and the field, never the values.
    later = {**meta, "versions": {**meta["versions"], "ctray": "9.0"}}
    later["recipe"] = {**meta["recipe"], "future_knob": "CANARY-VALUE"}
    (tmp_path / "ctfm" / "export" / "export.json").write_text(json.dumps(later))
    with pytest.raises(ConfigError) as err:
        load_encoder(str(tmp_path / "ctfm"))
    line = str(err.value)
    assert "written by ctray 9.0, whose recipe settings this ctray" in line and "(at future_knob)" in line
    assert "CANARY-VALUE" not in line and "\n" not in line
    meta["format"] = 99
    (tmp_path / "ctfm" / "export" / "export.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"export format 99 \(ctray \d.*reads formats 1, 2"):
        load_encoder(str(tmp_path / "ctfm"))
