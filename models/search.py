"""Embed and match your own images and texts: the functions of earlier versions, now thin
wrappers over `models.load` (models/api.py), which is what new code should use:

    from models import search
    model = search.load('flickr30k.pth', 'configs/Retrieval_flickr.yaml')   # a models.api.LoadedModel
    images = search.image_embeddings(model, ['a.jpg', 'b.jpg'])     # (2, 256), L2-normalised
    texts = search.text_embeddings(model, ['a dog', 'two cats'])      # (2, 256), L2-normalised
    similarity = images @ texts.T                                      # ITC similarity
    scores = search.itm_scores(model, ['a.jpg', 'a.jpg'], ['a dog', 'two cats'])  # ITM, per pair

Images are paths, PIL images or already transformed (B, 3, H, W) tensors; they are resized to
`image_res` as in evaluation. A progress bar appears for long lists.
"""
from .api import load as _load

PROGRESS_BATCHES = 10  # show a progress bar from this many batches on


def load(checkpoint, config=None, device=None, text_encoder=None):
    """`models.load(checkpoint)`, with the model keys of `config` (a task YAML path or a dict)
    overriding the checkpoint's stored config."""
    return _load(checkpoint, device=device, text_encoder=text_encoder, config=config)


def _progress(n, batch_size):
    return n >= PROGRESS_BATCHES * batch_size


def image_embeddings(model, images, batch_size=64):
    """(N, embed_dim) L2-normalised image features (the ITC space)."""
    return model.embed_images(images, batch_size, progress=_progress(len(images), batch_size))


def text_embeddings(model, texts, batch_size=256):
    """(M, embed_dim) L2-normalised text features (the ITC space)."""
    return model.embed_texts(texts, batch_size, progress=_progress(len(texts), batch_size))


def itm_scores(model, images, texts, batch_size=64, probability=True):
    """The image-text matching score of each pair (images[i], texts[i]): the ITM probability of
    "match" (or the raw positive logit, as the retrieval evaluation uses, with probability=False)."""
    if len(images) != len(texts):
        raise ValueError(f'itm_scores scores pairs: got {len(images)} images and {len(texts)} texts')
    progress = _progress(len(texts), batch_size)
    if probability:
        return model.itm(images, texts, batch_size, progress)
    return model.itm_logits(images, texts, batch_size, progress)[:, 1]
