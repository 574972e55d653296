"""CT-FM intra-sample SimCLR (Pai et al. 2025; public code: project-lighter/CT-FM), top to bottom:

- config.py: the recipe's settings (paper defaults; the released code's where it differs, noted);
- sampler.py: CPU side, in Ray Data: M random patches per scan, sliced out of the stored int16
  volume (padded with -1024 HU where the scan is smaller than a patch);
- task.py: device side: window, two augmented views per patch (shared augmentations,
  ctray.objectives.ctfm.augment), SegResEncoder + MLP head (ctray.objectives.ctfm.encoder), and the
  intra-sample NT-Xent over each scan's 2M views (ctray.objectives.losses);
- recipe.py: the registry entry and the default sweep space.

Defaults follow the paper (16 scans per global batch, temperature 0.1) except where its released
code disagrees and is the one that can run: 15 patches of 32x128x128 per scan (the paper's 24
slices do not divide by the encoder's 16x downsampling); the augmentations are the released ones.

This package's __init__ imports nothing: Ray Data's task processes import the sampler module
alone, without torch.
"""
