"""The torch-free half of the recipe contract: the base of every recipe's config section and the
assets a recipe's `prepare` hands its task and sampler. Config loading, `ctray --help` and Ray
Data's sampler processes import recipe configs; none of them may pay for torch (a test imports
every recipe's config module in a fresh interpreter and finds no torch)."""

from __future__ import annotations

from ctray.config import Section, StorageConfig


class RecipeConfig(Section):
    """Base of every objective's config section (`objective:` in a pretrain job)."""

    name: str
    """The registered objective (`ctray pretrain --help` lists them)."""

    @classmethod
    def variants(cls) -> dict[str, type[Section]]:
        """Every registered objective's config, by name (only on this base: a recipe's own config
        stands for itself)."""
        if cls is not RecipeConfig:
            return {}
        from ctray.objectives import config_class, objective_names

        return {name: config_class(name) for name in objective_names()}

    def counted_anatomies(self) -> list[str]:
        """The anatomies of which each scan gives one view, as a batch counts them (the linear lr
        rule's optim.lr_views_per_scan: anatomies); none for recipes whose views are not anatomies."""
        return []


class Assets(Section):
    """What an objective's driver-side `prepare` computes once for every rank's task and sampler
    (JSON-able: it travels in the workers' config, and export.json keeps the sampler's part)."""

    tokenizer_json: str | None = None
    """The run's WordPiece tokenizer (tokenizers' JSON), trained on the shards' reports; objectives
    with a text tower."""
    anatomy_labels: dict[str, list[int]] | None = None
    """Anatomy -> its TotalSegmentator label ids, from the config or the shards' manifest (CA-GCL)."""
    init_from: str | None = None
    """A checked stage-1 export's VideoMAE folder to start the vision encoder from (TotalFM stage 2)."""
    storage: StorageConfig | None = None
    """The storage settings `init_from` is read with (a StorageConfig as JSON)."""
    organ_cache: str | None = None
    """The training shard set's organ cache folder (TotalFM, OrganInput.cache): the training
    sampler reads the organ volumes from it."""

    def for_export(self) -> Assets:
        """The part export.json keeps: the sampler's settings. The tokenizer is saved in the text
        part's folder; the stage-1 hand-off, the storage settings and the training shards' organ
        cache belong to the training run."""
        return self.model_copy(update={"tokenizer_json": None, "init_from": None, "storage": None, "organ_cache": None})
