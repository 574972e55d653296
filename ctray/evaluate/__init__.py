"""Evaluation: the metric code (zero-shot, probes, retrieval, bootstrap CIs, plots) and `ctray eval`'s
report over an embeddings folder written by `ctray embed`.

    from ctray.evaluate.config import EvalReportConfig
    from ctray.evaluate.run import run_eval
    from ctray.export import load_encoder
    result = run_eval(EvalReportConfig(embeddings="runs/x/embeddings"), load_encoder)  # -> EvalResult

Modules: config (EvalReportConfig), embeddings (reading and checking the folder), zeroshot (the
zero-shot metric code, shared with the in-training evaluation of anatomy-text tasks), bootstrap
(percentile CIs over groups), probe (linear probe and kNN, group k-fold CV), retrieval (precision@k,
recall@k), plots (figures with their numbers), report (the folder), result (what an in-training
evaluation returns), run (run_eval).

The package sits beneath the recipes (ctray.objectives evaluates through it) and so imports none of
them, nor the export that rebuilds them: `run_eval` takes the loader of an export's text tower.
This __init__ imports nothing, so that a recipe importing the metric code does not pay for the rest.
"""
