"""ALBEF models: the ViT image encoder, BERT with fusion layers, and the six task variants.

`models.load(checkpoint)` (models/api.py) loads any checkpoint for inference in one call; it is
imported on first use, so `import models.model_retrieval` stays as light as before."""


def __getattr__(name):
    if name in ('load', 'LoadedModel', 'TaskError', 'GradCam'):
        from . import api
        return getattr(api, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
