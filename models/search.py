"""Embed and match your own images and texts with a retrieval or pre-training checkpoint.

    from models import search
    model = search.load('flickr30k.pth', 'configs/Retrieval_flickr.yaml')
    images = search.image_embeddings(model, ['a.jpg', 'b.jpg'])     # (2, 256), L2-normalised
    texts = search.text_embeddings(model, ['a dog', 'two cats'])      # (2, 256), L2-normalised
    similarity = images @ texts.T                                      # ITC similarity
    scores = search.itm_scores(model, ['a.jpg', 'a.jpg'], ['a dog', 'two cats'])  # ITM, per pair

Images are paths, PIL images or already transformed (B, 3, H, W) tensors; they are resized to the
config's `image_res` as in evaluation.
"""
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .model_retrieval import ALBEF
from .retrieval_eval import image_features, itm_logits, text_features
from .tokenization_bert import BertTokenizer


def load(checkpoint, config, device=None, text_encoder=None):
    """The retrieval model of `config` (a YAML path or a dict) with `checkpoint` loaded, in eval
    mode, with `.tokenizer` and `.transform` attached."""
    from dataset import build_transform
    if not isinstance(config, dict):
        from ruamel.yaml import YAML
        with open(config) as f:
            config = YAML(typ='safe').load(f)
    config = {'distill': False, 'queue_size': 1, 'momentum': 0.995, 'temp': 0.07, **config}
    tokenizer = BertTokenizer.from_pretrained(text_encoder or config.get('text_encoder', 'bert-base-uncased'))
    model = ALBEF(config=config, tokenizer=tokenizer)
    load_checkpoint(model, checkpoint, allow_new_heads=False)
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model = model.to(device).eval()
    model.transform = build_transform('test', config['image_res'])
    return model


def _device(model):
    return next(model.parameters()).device


def _image_batches(model, images, batch_size, desc):
    """Transformed image tensors in batches, with a progress bar for long inputs."""
    if torch.is_tensor(images):
        chunks = images.split(batch_size)
    else:
        def to_tensor(image):
            if isinstance(image, str):
                with Image.open(image) as f:
                    image = f.convert('RGB')
            return model.transform(image.convert('RGB'))
        chunks = (torch.stack([to_tensor(i) for i in images[s:s + batch_size]])
                  for s in range(0, len(images), batch_size))
    total = -(-len(images) // batch_size)
    return tqdm(chunks, total=total, desc=desc, disable=total < 10, leave=False)


@torch.no_grad()
def image_embeddings(model, images, batch_size=64):
    """(N, embed_dim) L2-normalised image features (the ITC space)."""
    out = [image_features(model, batch.to(_device(model)))[1]
           for batch in _image_batches(model, images, batch_size, 'images')]
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(model, texts, batch_size=256, max_length=30):
    """(M, embed_dim) L2-normalised text features (the ITC space)."""
    embeds = [text_features(model, texts[s:s + batch_size], model.tokenizer, _device(model),
                            max_length=max_length)[1]
              for s in tqdm(range(0, len(texts), batch_size), desc='texts', disable=len(texts) < 10 * batch_size,
                            leave=False)]
    return torch.cat(embeds)


@torch.no_grad()
def itm_scores(model, images, texts, batch_size=64, max_length=30, probability=True):
    """The image-text matching score of each pair (images[i], texts[i]): the ITM probability of
    "match" (or the raw positive logit, as the retrieval evaluation uses, with probability=False)."""
    if len(images) != len(texts):
        raise ValueError(f'itm_scores scores pairs: got {len(images)} images and {len(texts)} texts')
    scores = []
    for start, batch in zip(range(0, len(texts), batch_size), _image_batches(model, images, batch_size, 'pairs')):
        device = _device(model)
        image_feats = image_features(model, batch.to(device))[0]
        text_feats, _, text_atts = text_features(model, texts[start:start + batch_size], model.tokenizer, device,
                                                 max_length=max_length)
        logits = itm_logits(model, image_feats, text_feats, text_atts)
        scores.append(F.softmax(logits, dim=1)[:, 1] if probability else logits[:, 1])
    return torch.cat(scores)
