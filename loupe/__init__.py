"""loupe: an open implementation of LOUPE (fine-grained semantically aligned vision-language pre-training)."""

__version__ = "0.1.0"


def load(path, map_location="cpu"):
    """Load a trained model (a training output directory with ``model.pt``) in eval mode.

    The model offers ``encode_image``, ``encode_text`` and ``phrase_features``; see
    :func:`loupe.model.load`.
    """
    from .model import load as _load
    return _load(path, map_location=map_location)


def __getattr__(name):
    # the model classes are imported lazily, so that `import loupe` (and loupe.data) stays light
    if name in ("LoupeConfig", "LoupeModel"):
        from . import model
        return getattr(model, name)
    raise AttributeError(f"module 'loupe' has no attribute {name!r}")
