"""Grad-CAM maps of ALBEF (docs/DESIGN.md, "Grounding (Grounding.py) and Grad-CAM"), shared by
Grounding.py and visualize.ipynb.

Two modes, as in the paper's weakly-supervised grounding:

* ITM: the cross-attention of fusion layer `block_num` of the text encoder. The map of text token
  t is the head average of attention(t -> patch) x max(0, d ITM-positive-logit / d attention).
  `itm_gradcam` returns one map per token and their average over the L text positions (the
  expression map the grounding evaluation scores boxes with). `caption_map` averages the token
  maps over the caption's word pieces only: the whole-caption map drawn beside the per-word ones.
* ITC: the attention of ViT block `block_num` from the image [CLS] to the patches, times its
  clamped gradient of the image-text similarity. The text enters only through its [CLS] feature,
  so there is one map per image-text pair.

The patch grid and the number of heads are read from the model, so any image resolution, patch
size and width work (the original hard-codes 24 x 24 patches and 12 heads, i.e. 384 px ViT-B/16).
The attention capture uses the models' own Grad-CAM support (`save_attention` on a cross-attention,
`register_blk` on the ViT, whose hook stores the block's attention probabilities and their gradient
on `blocks[i].attn`); the flag and the captured tensors are cleared afterwards.
"""
import cv2
import numpy as np
import torch
import torch.nn.functional as F

MODES = ('itm', 'itc')


# ---- which block ---------------------------------------------------------------------------------
def _bert(model):
    return model.text_encoder.base_model  # BertModel itself, or `.bert` of a BertForMaskedLM


def fusion_layers(model):
    """Indices of the text-encoder layers with cross-attention (6-11 for ALBEF)."""
    return [i for i, layer in enumerate(_bert(model).encoder.layer) if layer.has_cross_attention]


def default_block_num(model, mode):
    """The block the original uses, generalised to smaller models: 8 in both modes for ALBEF.

    ITM: fusion_layer + (number of fusion layers) // 3, i.e. 6 + 6 // 3 = 8 of 12 BERT layers
    (4 for the demo's 6-layer BERT fused from layer 3). ITC: 2 * depth // 3, i.e. ViT block 8 of 12.
    """
    if mode == 'itm':
        layers = fusion_layers(model)
        return layers[0] + len(layers) // 3
    if mode == 'itc':
        return 2 * len(model.visual_encoder.blocks) // 3
    raise ValueError(f"Grad-CAM mode must be one of {', '.join(MODES)}, got {mode!r}")


def word_blocks(model):
    """The fusion layers whose per-word ITM Grad-CAM is informative: all but the last, where only
    the [CLS] row reaches the ITM head, so every word's map is zero (all of them if there is one)."""
    layers = fusion_layers(model)
    return layers[:-1] if len(layers) > 1 else layers


def word_block(model, block_num=None):
    """`block_num` (default `default_block_num(model, 'itm')`) clipped to `word_blocks(model)`:
    8 stays 8 for ALBEF (6-10); the demo model, fused at 3-5, gets 4."""
    blocks = word_blocks(model)
    block_num = default_block_num(model, 'itm') if block_num is None else int(block_num)
    return min(max(block_num, blocks[0]), blocks[-1])


def check_block_num(model, mode, block_num):
    """Raise ValueError, naming the valid range, unless `block_num` is a usable block for `mode`."""
    if mode == 'itm':
        valid = fusion_layers(model)
        what = (f'a text-encoder layer with cross-attention: this model has {len(_bert(model).encoder.layer)} '
                f'layers fused from layer {valid[0]}, so {valid[0]}-{valid[-1]}')
    elif mode == 'itc':
        valid = list(range(len(model.visual_encoder.blocks)))
        what = f'a ViT block: this model has {len(valid)}, so 0-{len(valid) - 1}'
    else:
        raise ValueError(f"Grad-CAM mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(block_num, bool) or not isinstance(block_num, int) or block_num not in valid:
        raise ValueError(f'block_num {block_num!r} is not valid for {mode.upper()} Grad-CAM: it must be {what}')
    return block_num


def patch_grid(model):
    """(h, w): the ViT's patch grid, e.g. (24, 24) at 384 px with 16-pixel patches."""
    return tuple(model.visual_encoder.patch_embed.grid_size)


# ---- the two modes ------------------------------------------------------------------------------
def itm_gradcam(model, image, text, block_num=None):
    """Grad-CAM of the ITM positive logit at the cross-attention of text layer `block_num`.

    Args:
        model: an ALBEF with `visual_encoder`, `text_encoder` and `itm_head` (retrieval/grounding).
        image: (B, 3, H, W) normalised images.
        text: tokenizer output with `input_ids` and `attention_mask` (B, L).
        block_num: a fusion layer; default `default_block_num(model, 'itm')`.
    Returns:
        (token_maps (B, L, h, w), expression_map (B, h, w)): per text position (padding positions
        are zero, [CLS] included) and their mean over all L positions, as the original averages.
    """
    block_num = default_block_num(model, 'itm') if block_num is None else block_num
    check_block_num(model, 'itm', block_num)
    bert = _bert(model)
    attention = bert.encoder.layer[block_num].crossattention.self
    h, w = patch_grid(model)
    attention.save_attention = True
    try:
        with torch.enable_grad():
            # The ViT is outside the gradient path that matters (the attention map is downstream of
            # the image tokens), so it runs without a graph; the tokens are made a leaf that needs a
            # gradient so the captured map has one even when the weights are frozen.
            with torch.no_grad():
                image_embeds = model.visual_encoder(image)
            image_embeds.requires_grad_(True)
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
            output = bert(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                          encoder_attention_mask=image_atts, return_dict=True)
            loss = model.itm_head(output.last_hidden_state[:, 0, :])[:, 1].sum()
            attention_map = attention.get_attention_map()
            torch.autograd.grad(loss, attention_map)  # the tensor hook stores the gradient
            gradients = attention.get_attn_gradients()
        B, heads, L, _ = attention_map.shape
        mask = text.attention_mask.view(B, 1, L, 1, 1)
        # (B, heads, L, 1 + h*w): drop the image [CLS] column, patches to (h, w)
        cams = attention_map.detach()[:, :, :, 1:].reshape(B, heads, L, h, w) * mask
        grads = gradients[:, :, :, 1:].clamp(min=0).reshape(B, heads, L, h, w) * mask
        token_maps = (cams * grads).mean(dim=1)
        return token_maps, token_maps.mean(dim=1)
    finally:
        attention.save_attention = False
        attention.attention_map = attention.attn_gradients = None


def caption_map(token_maps, text, skip_ids=()):
    """The whole caption's Grad-CAM: the mean of the per-token maps over its word pieces.

    A word piece is a text position with attention mask 1 other than position 0 ([CLS]) and other
    than a token in `skip_ids` (pass the tokenizer's [SEP] id: ALBEF's tokenizer adds none to a
    caption, but a standard BERT tokenizer does). Unlike the grounding's expression map (the mean
    over all L positions, [CLS] and padding included) the [CLS] row is left out: the ITM head reads
    it, but it is not part of what the caption says.

    Args:
        token_maps: (B, L, h, w), the first output of `itm_gradcam`.
        text: the tokenizer output it was computed from (`input_ids`, `attention_mask`).
    Returns:
        (B, h, w); zero for a text with no word piece.
    """
    words = text.attention_mask.bool().clone()
    words[:, 0] = False
    for token_id in skip_ids:
        words &= text.input_ids != token_id
    weights = words.to(token_maps.dtype)[:, :, None, None]
    return (token_maps * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def to_image_size(maps, width, height):
    """(N, h, w) maps as (N, height, width) float32 arrays in [0, 1], as `LoadedModel.gradcam`
    returns them: each shifted to a minimum of 0 and divided by its maximum (if above 0) on the
    patch grid, then resized bicubically to the image and clipped to [0, 1]."""
    if torch.is_tensor(maps):
        maps = maps.detach().float().cpu().numpy()
    out = np.zeros((len(maps), height, width), dtype=np.float32)
    for i, small in enumerate(maps):
        out[i] = np.clip(cv2.resize(_normalise(small), (width, height), interpolation=cv2.INTER_CUBIC), 0, 1)
    return out


def itc_gradcam(model, image, text, block_num=None):
    """Grad-CAM of the image-text similarity at ViT block `block_num` (image [CLS] -> patches).

    Each image is scored against its own text: the loss is the trace of
    normalize(vision_proj(image CLS)) . normalize(text_proj(text CLS))^T / temp.

    Returns:
        (B, h, w) maps.
    """
    block_num = default_block_num(model, 'itc') if block_num is None else block_num
    check_block_num(model, 'itc', block_num)
    attention = model.visual_encoder.blocks[block_num].attn
    h, w = patch_grid(model)
    try:
        with torch.enable_grad():
            # a leaf input that needs a gradient: the captured map has one even with frozen weights
            image = image.detach().requires_grad_(True)
            image_embeds = model.visual_encoder(image, register_blk=block_num)
            image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
            text_embeds = _bert(model)(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                                       mode='text').last_hidden_state
            text_feat = F.normalize(model.text_proj(text_embeds[:, 0, :]), dim=-1)
            loss = (image_feat @ text_feat.t() / model.temp).diag().sum()
            attention_map = attention.attention_map
            torch.autograd.grad(loss, attention_map)
            gradients = attention.attn_gradients
        B, heads = attention_map.shape[:2]
        # (B, heads, N, N): the [CLS] query row over the patch keys, to (h, w)
        cams = attention_map.detach()[:, :, 0, 1:].reshape(B, heads, h, w)
        grads = gradients[:, :, 0, 1:].clamp(min=0).reshape(B, heads, h, w)
        return (cams * grads).mean(dim=1)
    finally:
        attention.attention_map = attention.attn_gradients = None


def expression_gradcam(model, image, text, mode='itm', block_num=None):
    """The (B, h, w) map that grounding scores boxes with, in either mode."""
    if mode == 'itm':
        return itm_gradcam(model, image, text, block_num)[1]
    if mode == 'itc':
        return itc_gradcam(model, image, text, block_num)
    raise ValueError(f"Grad-CAM mode must be one of {', '.join(MODES)}, got {mode!r}")


# ---- drawing ------------------------------------------------------------------------------------
def _normalise(a):
    a = a - a.min()
    top = a.max()
    return a / top if top > 0 else a


def overlay(image, gradcam_map, blur=True, overlap=True):
    """Colour a Grad-CAM map over an image, as the original notebook's getAttMap does.

    Args:
        image: (H, W, 3) float RGB in [0, 1].
        gradcam_map: (h, w) array or tensor.
    Returns:
        (H, W, 3) float RGB: (1 - a^0.7) * image + a^0.7 * jet(a), where a is the map scaled to
        [0, 1], resized to the image (bicubic) and blurred (sigma = 2% of the longer side).

    OpenCV stands in for the original's skimage/scipy/matplotlib calls (bicubic resize, Gaussian
    blur, the jet colormap), so the picture is the same but not bit-identical.
    """
    if torch.is_tensor(gradcam_map):
        gradcam_map = gradcam_map.detach().float().cpu().numpy()
    height, width = image.shape[:2]
    a = _normalise(np.asarray(gradcam_map, dtype=np.float32))
    # cubic interpolation overshoots a little; keep [0, 1] so that a ** 0.7 stays real
    a = np.clip(cv2.resize(a, (width, height), interpolation=cv2.INTER_CUBIC), 0, 1)
    if blur:
        a = _normalise(cv2.GaussianBlur(a, (0, 0), sigmaX=0.02 * max(height, width)))
    colour = cv2.applyColorMap(np.uint8(np.round(255 * a)), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    if not overlap:
        return colour
    weight = (a ** 0.7)[..., None]
    return (1 - weight) * image + weight * colour
