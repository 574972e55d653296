"""TotalFM's two stages and CA-GCL through the real trainer: phantoms with masks and reports ->
shards -> Ray Data -> Ray Train with 2 DeepSpeed workers (gloo) -> checkpoints, evaluation files,
export. Models are tiny and randomly initialised (no hub model can be downloaded here); the text
tower's WordPiece tokenizer is trained on the phantoms' reports."""

import json
from pathlib import Path

import pytest
import torch
from transformers import VideoMAEModel

from ctray.config import load_config
from ctray.data.phantoms import report_prompts, write_dataset
from ctray.errors import ConfigError
from ctray.objectives import get_objective
from ctray.objectives.totalfm.clip import TotalFMCLIPTask
from ctray.quickstart import evaluate_run
from ctray.train.config import PretrainConfig
from ctray.train.trainer import run_pretrain

from helpers import PHANTOM_SHAPE, PHANTOM_SPACING, REPO, ingest_cfg, read_metrics

PROMPTS = (
    'objective.zero_shot.templates=[["{finding} is present in the {anatomy}.","The {anatomy} is normal."],'
    '["{finding} is seen in the {anatomy}.","The {anatomy} is unremarkable."]]'
)


@pytest.fixture(scope="module")
def clinical_shards(ray_local, tmp_path_factory) -> Path:
    from ctray.ingest.job import run_ingest

    root = tmp_path_factory.mktemp("clinical")
    data = root / "data"
    write_dataset(str(data), 16, seed=3, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    run_ingest(
        ingest_cfg(
            data / "scans",
            root / "shards",
            "output.scans_per_shard=4",
            masks=data / "masks",
            reports=data / "reports.jsonl",
        )
    )
    return root / "shards"


def job(name: str, shards, storage, *overrides) -> PretrainConfig:
    """The local job on these shards, in bf16 as on GPUs."""
    where = [f"data.shards={shards}", f"run.storage={storage}", "deepspeed.precision=bf16"]
    return load_config(PretrainConfig, REPO / "jobs" / name, [*where, *overrides])


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir, "steps")]


def test_totalfm_lr_counts_the_organ_volumes_the_scans_have(clinical_shards, tmp_path):
    """The linear lr rule counts VideoMAE's videos: per scan, the recipe's organs with a stored box
    (one volume each), counted here row by row; a recipe whose views are not anatomies refuses it."""
    import pyarrow.parquet as pq

    from ctray.ingest.shardset import ShardSet
    from ctray.train.trainer import anatomies_per_scan

    scaled = ["optim.lr_base_batch=256", "optim.lr_views_per_scan=anatomies"]
    cfg = job(
        "totalfm-mae-local.yaml", clinical_shards, tmp_path, *scaled, "objective.organs.anatomies=[liver,kidney,lung]"
    )
    organs = {"liver", "kidney", "lung"}
    rows = [
        r
        for p in clinical_shards.glob("shards/*.parquet")
        for r in pq.read_table(p, columns=["anatomy_boxes"]).to_pylist()
    ]
    naive = sum(len({b["anatomy"] for b in r["anatomy_boxes"]} & organs) for r in rows) / len(rows)
    assert anatomies_per_scan(cfg, ShardSet.open(str(clinical_shards), cfg.storage)) == pytest.approx(naive)
    assert 0 < naive <= 3
    with pytest.raises(ConfigError, match="ctfm_simclr counts no anatomies per scan"):
        job("ctfm-local.yaml", clinical_shards, tmp_path, *scaled)


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_totalfm_stage1_to_stage2_zero_shot(clinical_shards, tmp_path):
    mae = job(
        "totalfm-mae-local.yaml",
        clinical_shards,
        tmp_path,
        "train.max_steps=16",
        "train.log_every=4",
        "train.checkpoint_every=16",
    )
    run_pretrain(mae)
    stage1 = tmp_path / "totalfm-mae-local"
    mae_loss = losses(stage1)
    assert mae_loss[-1] < mae_loss[0]

    clip = job(
        "totalfm-clip-local.yaml",
        clinical_shards,
        tmp_path,
        f"objective.init_from={stage1}",
        "data.scans_per_batch=8",
        "objective.soft_targets=true",
        "optim.lr=2e-3",
        "optim.min_lr_ratio=0.3",
        "train.max_steps=60",
        "train.log_every=10",
        "train.checkpoint_every=60",
        "eval.every=30",
        PROMPTS,
    )
    # Finding-wise prompts in the phantoms' report wording: a text tower trained from scratch for a
    # minute on 16 phantoms knows no other language. (At init, image and prompt embeddings are
    # random projections, and their agreement with the labels is a coin flip shared by all
    # findings, AUROC ~0.25 or ~0.75; the training is what makes the direction right.)
    clip.objective.zero_shot.finding_prompts = report_prompts()
    # Hand-off: the stage-2 vision tower starts as the stage-1 encoder, tensor for tensor.
    assets = get_objective("totalfm_clip").prepare(clip.objective, clip.data.shards, clip.run_folder())
    exported = VideoMAEModel.from_pretrained(stage1 / "export" / "vision").state_dict()
    vision = TotalFMCLIPTask(clip.objective, assets).vision.state_dict()
    assert exported.keys() == vision.keys() and all(torch.equal(exported[k], vision[k]) for k in exported)

    run_pretrain(clip)
    run = tmp_path / "totalfm-clip-local"
    clip_loss = losses(run)
    assert sum(clip_loss[-3:]) < sum(clip_loss[:3])
    for step in (30, 60):
        assert {p.name for p in (run / "eval" / f"step_{step:08d}").iterdir()} == {
            "zero_shot.json",
            "zero_shot.md",
            "text_similarity.png",
        }
    report = json.loads((run / "eval" / "step_00000060" / "zero_shot.json").read_text())
    assert len(report["per_template"]) == 4  # 2 templates x (finding-wise, organ-wise)
    # Finding presence (7 findings, each in about half the organs), zero-shot, on the 16 phantoms.
    assert report["metrics"]["zs_finding_auroc_mean"] > 0.6, report["metrics"]

    with pytest.raises(ConfigError, match="different organs"):
        other = clip.objective.model_copy(
            update={"organs": clip.objective.organs.model_copy(update={"size": (8, 16, 16)})}
        )
        get_objective("totalfm_clip").prepare(other, clip.data.shards, clip.run_folder())
    with pytest.raises(ConfigError, match=r"different encoder than objective.model \(hidden_size"):
        other = clip.objective.model_copy(update={"model": clip.objective.model.model_copy(update={"hidden_size": 64})})
        get_objective("totalfm_clip").prepare(other, clip.data.shards, clip.run_folder())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cagcl_trains_with_two_workers(clinical_shards, tmp_path):
    cfg = job(
        "cagcl-local.yaml",
        clinical_shards,
        tmp_path,
        "data.scans_per_batch=8",
        "train.max_steps=40",
        "train.log_every=8",
        "train.checkpoint_every=40",
        "optim.lr=3e-3",
        "objective.soft_targets=true",
        PROMPTS,
    )
    result = run_pretrain(cfg)
    run = tmp_path / "cagcl-local"
    loss = losses(run)
    assert result.step == 40 and sum(loss[-2:]) < sum(loss[:2])
    last = read_metrics(run)[-1]
    assert last["loss_global"] > 0 and last["loss"] == pytest.approx(
        last["loss_local"] + 0.1 * last["loss_global"], rel=0.05
    )
    assert 0 <= last["text_cos_std"] and -1 <= last["text_cos_mean"] <= 1 and 0 <= last["zs_finding_auroc_mean"] <= 1
    assert (run / "eval" / "step_00000040" / "text_similarity.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "export" / "vision" / "model.safetensors").exists()
    assert (run / "export" / "text" / "tokenizer.json").exists()

    # As the quickstart ends: the run's export embeds its shards and `ctray eval` reports on them.
    report = evaluate_run(cfg, result.export, str(tmp_path / "embeddings"))
    metrics = json.loads((tmp_path / "embeddings" / "report" / "metrics.json").read_text())
    assert report.endswith("report.md") and 0 <= metrics["metrics"]["zs_finding_auroc_mean"] <= 1


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("recipe", ["cagcl-local.yaml", "totalfm-clip-local.yaml"])
def test_clip_recipes_same_seed_same_losses_and_a_killed_run_resumes_them(recipe, clinical_shards, tmp_path):
    """CA-GCL and TotalFM stage 2 as reproducible as CT-FM (test_reproducible.py): their tokenizer
    is trained in each run (a function of the shards' sentences), so a run whose worker is killed at
    step 5 and resumed from its step-3 checkpoint logs the losses of the straight run, step for
    step. (TotalFM starts from random init here: the stage-1 hand-off has its own test.)"""
    steps = ["train.max_steps=6", "train.log_every=1", "train.checkpoint_every=3", "data.scans_per_batch=4"]
    if recipe.startswith("totalfm"):
        steps.append("objective.init_from=null")
    run_pretrain(job(recipe, clinical_shards, tmp_path, *steps, "run.name=straight"))
    killed = job(recipe, clinical_shards, tmp_path, *steps, "run.name=killed", "debug.kill_at_step=5")
    killed.run.max_failures = 1
    assert run_pretrain(killed).step == 6
    assert [r["step"] for r in read_metrics(tmp_path / "killed", "resume")] == [3]
    assert (tmp_path / "straight" / "tokenizer.json").read_bytes() == (
        tmp_path / "killed" / "tokenizer.json"
    ).read_bytes()
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6, abs=1e-7)
