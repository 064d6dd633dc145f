"""Freezing a tower (README.md, "Recipes"): the image encoder, the text encoder, or
the lower blocks of either, left out of training (open_clip's --lock-image / --lock-text).

`freeze_towers(model, vision, text)` sets `requires_grad = False` on the chosen online parameters.
Everything else follows from that flag: the optimizer holds only trainable parameters
(optim.create_optimizer), DistributedDataParallel skips them, and a frozen parameter's momentum
copy is kept equal to it (models/base.py, `_momentum_update`) instead of being averaged towards it.

What each setting freezes (every ALBEF variant has a `visual_encoder` ViT and a BERT `text_encoder`):

* vision true: the whole ViT (patch embedding, [CLS] token, position embedding, every block and the
  final norm). vision N: the patch embedding, [CLS] token, position embedding and blocks 0..N-1.
* text true: the text encoder of the paper, i.e. BERT's embeddings and its layers without
  cross-attention (0-5 of ALBEF's 12); the fusion layers (the multimodal encoder) keep training.
  text N: the embeddings and layers 0..N-1. Pre-training's MLM decoder shares its weight with the
  word embeddings, so it is frozen with them.
* false or 0: nothing. Heads, projections, the temperature and the VQA decoder are never frozen.
"""

FREEZE_KEYS = ('freeze_vision', 'freeze_text')  # the config keys (and flags) of the two settings


def _bert(model):
    return model.text_encoder.base_model  # BertModel itself, or `.bert` of a BertForMaskedLM


def text_layers(model):
    """The number of text-encoder layers before the first one with cross-attention (6 for ALBEF)."""
    layers = _bert(model).encoder.layer
    return next((i for i, layer in enumerate(layers) if layer.has_cross_attention), len(layers))


def _lower(setting, available, key, what):
    """The modules' count to freeze for `setting` (True: all `available`), checked against them."""
    if setting is True:
        return available
    if setting is False or setting is None:
        return 0
    if not isinstance(setting, int) or not 0 <= setting <= available:
        raise ValueError(f'{key}: expected true, false or a number of {what} from 0 to {available} (this model '
                         f'has {available}), got {setting!r}')
    return setting


def _span(name, n):
    return f'{name} 0' if n == 1 else f'{name}s 0-{n - 1}'


def vision_modules(model, setting):
    """(parameter owners to freeze, a description) for the `freeze_vision` setting."""
    vit = model.visual_encoder
    if setting is True:
        return [vit], 'the image encoder'
    n = _lower(setting, len(vit.blocks), 'freeze_vision', 'ViT blocks')
    if not n:
        return [], ''
    stem = [vit.patch_embed] + [p for p in (vit.cls_token, vit.pos_embed) if p is not None]
    return stem + list(vit.blocks[:n]), f"the image encoder's patch embedding and {_span('block', n)}"


def text_modules(model, setting):
    """(parameter owners to freeze, a description) for the `freeze_text` setting."""
    bert = _bert(model)
    n = _lower(setting, text_layers(model), 'freeze_text', 'text layers')
    if not n:
        return [], ''
    what = 'the text encoder' if setting is True else f"the text encoder's embeddings and {_span('layer', n)}"
    return [bert.embeddings] + list(bert.encoder.layer[:n]), what


def freeze_towers(model, vision=False, text=False):
    """Freeze what `vision` and `text` (each false, true or a number of lower blocks) name; returns
    a description ('' when nothing is frozen). Raises ValueError for a setting the model cannot have."""
    owners, parts = [], []
    for modules, what in (vision_modules(model, vision), text_modules(model, text)):
        owners += modules
        parts += [what] if what else []
    for owner in owners:
        for param in owner.parameters() if hasattr(owner, 'parameters') else [owner]:
            param.requires_grad_(False)
    return ' and '.join(parts)


def parameter_counts(model):
    """(trained, total) numbers of the model's own parameters; the momentum copies (never trained
    by the optimizer) are not counted."""
    momentum = {id(p) for _, copy in getattr(model, 'model_pairs', []) for p in copy.parameters()}
    own = [p for p in model.parameters() if id(p) not in momentum]
    return sum(p.numel() for p in own if p.requires_grad), sum(p.numel() for p in own)
