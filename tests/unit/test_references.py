"""Every repository file that the README, the cluster configs and the jobs name exists: a renamed or
never-added file otherwise lives on in the instructions people follow (`cluster/aws-iam.json` did)."""

import re

import pytest

from helpers import REPO

# Where instructions live: the README, and comments in the cluster configs and jobs.
SOURCES = [
    "README.md",
    *(str(p.relative_to(REPO)) for d in ("cluster", "jobs", "ctray/jobs") for p in (REPO / d).rglob("*")),
]
# A path from the repository root: under a top-level folder, or a top-level file. Not a URL, not a piece of
# a longer path (s3://b/jobs/..., ray.io/...), not a placeholder (jobs/<name>.yaml, ${CTRAY_BUCKET}/...).
REFERENCE = re.compile(
    r"(?<![\w./${<-])((?:cluster|jobs|ctray|tests|\.ci)/[\w./*-]*[\w*]|pyproject\.toml|LICENSE|README\.md)(?![\w<>{}$-])"
)
URL = re.compile(r"\w+://\S+")


def references(text: str) -> list[str]:
    return [m[1] for m in REFERENCE.finditer(URL.sub("", text))]


def _exists(path: str) -> bool:
    return any(REPO.glob(path)) if "*" in path else (REPO / path).exists()


def test_the_pattern_finds_paths_and_skips_what_is_not_one():
    text = """`cluster/aws-iam-head.json` (see cluster/kuberay/*.yaml), jobs/<name>.yaml, s3://my-bucket/jobs/x.yaml
    https://github.com/o/r/blob/main/tests/x.py ${CTRAY_BUCKET}/ctray/runs/ ray.io/cluster pyproject.toml."""
    assert references(text) == ["cluster/aws-iam-head.json", "cluster/kuberay/*.yaml", "pyproject.toml"]


@pytest.mark.parametrize("source", sorted(s for s in SOURCES if (REPO / s).is_file()))
def test_named_files_exist(source):
    named = references((REPO / source).read_text(errors="replace"))
    assert [p for p in named if not _exists(p)] == [], f"{source} names files that are not in the repository"
