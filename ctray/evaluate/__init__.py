"""`ctray eval`: metrics, plots and one report over an embeddings folder written by `ctray embed`.

    from ctray.evaluate import EvalReportConfig, run_eval
    result = run_eval(EvalReportConfig(embeddings="runs/x/embeddings"))  # -> EvalResult

Modules: config (EvalReportConfig), embeddings (reading and checking the folder), bootstrap
(percentile CIs over scans), probe (linear probe and kNN, k-fold CV), retrieval (precision@k,
recall@k), plots (figures with their numbers), report (the folder), run (run_eval). The zero-shot
metric code lives in ctray.objectives.zeroshot, shared with the in-training evaluation.
"""

from ctray.evaluate.config import EvalReportConfig, ProbeConfig
from ctray.evaluate.run import EvalResult, run_eval
from ctray.objectives.zeroshot import TextTower, ZeroShotConfig

__all__ = ["EvalReportConfig", "EvalResult", "ProbeConfig", "TextTower", "ZeroShotConfig", "run_eval"]
