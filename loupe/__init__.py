"""loupe: an open implementation of LOUPE (fine-grained semantically aligned vision-language pre-training)."""

__version__ = "0.1.0"


def load(path, map_location="cpu"):
    """Load a trained model (a training output directory with ``model.pt``) in eval mode.

    The model offers ``encode_image``, ``encode_text`` and ``phrase_features``; see
    :func:`loupe.checkpoint.load`.
    """
    from .checkpoint import load as _load
    return _load(path, map_location=map_location)


def ground(model, image, text, **kw):
    """Boxes with scores for each phrase of ``text`` in ``image``; see :func:`loupe.ground.ground`."""
    from .ground import ground as _ground
    return _ground(model, image, text, **kw)


def __getattr__(name):
    # the model classes are imported lazily, so that `import loupe` (and loupe.data) stays light
    if name == "LoupeConfig":
        from .config import LoupeConfig
        return LoupeConfig
    if name == "LoupeModel":
        from .model import LoupeModel
        return LoupeModel
    raise AttributeError(f"module 'loupe' has no attribute {name!r}")
