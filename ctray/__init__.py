"""ctray: pretrain 3D CT foundation models at cluster scale on Ray + DeepSpeed."""

__version__ = "0.2.0"
