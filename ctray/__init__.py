"""ctray: pretrain 3D CT foundation models at cluster scale on Ray + DeepSpeed."""

__version__ = "0.2.0"

__all__ = ["__version__", "load_encoder"]


def __getattr__(name: str) -> object:
    # `ctray.load_encoder` without importing torch on `import ctray` (the CLI and Ray Data's
    # sampler processes import the package).
    if name == "load_encoder":
        from ctray.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'ctray' has no attribute {name!r}")
