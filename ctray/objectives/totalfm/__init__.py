"""TotalFM (organ-separated CT foundation model; only the abstract is public, so where it is silent
the recipe follows VideoMAE's and CLIP's public code, as said at the end), top to bottom:

- config.py: organ cut (shared by both stages, which must agree), VideoMAE size, each stage's config;
- sampler.py: CPU side: each organ's stored box plus a margin, resampled to T x H x W (the axial
  slices are the frames), windowed; batches keep the organ axis; stage 2 adds one finding
  sentence per organ (the shared anatomy-text sampler, ctray.data.samplers.AnatomyTexts);
- mae.py, stage 1 `totalfm_mae`: transformers' VideoMAEForPreTraining, 1 channel, tubelet 2,
  patch 16, tube masking at ratio ~0.9 and the normalised-pixel MSE;
- clip.py, stage 2 `totalfm_clip`: the stage-1 encoder (mean-pooled tokens -> LayerNorm ->
  projection) against one finding sentence of the organ per step through a BERT-style encoder
  (ctray.models.text): organ-wise CLIP InfoNCE in both directions with a learnable temperature,
  negatives = the same organ across the global batch (ctray.objectives.anatomy_text);
- recipe.py: the two registry entries and their default sweep spaces.

Where the abstract is silent we follow VideoMAE's public code (tube masking shares one spatial mask
over all frames; mean pooling as in VideoMAEForVideoClassification) and CLIP / open_clip (the loss
is (CE(image->text) + CE(text->image)) / 2, here averaged over the organs that have pairs).

This package's __init__ imports nothing: Ray Data's task processes import the sampler module
alone, without torch.
"""
