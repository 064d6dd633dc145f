"""The ViT image encoder of every ALBEF model: timm's VisionTransformer, configured as ALBEF uses it.

ALBEF's image encoder is a ViT-B/16 (12 pre-norm blocks of width 768 and 12 heads, LayerNorm eps
1e-6, a [CLS] token and learned position embeddings, no classification head) that returns all
1 + patches tokens after the final LayerNorm; the multimodal encoder attends to all of them.

The model is timm's own `timm.models.vision_transformer.VisionTransformer`, so its state_dict
names are timm's (`patch_embed.proj`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
`norm`) and DeiT and ALBEF checkpoints load unchanged. What we add:

* `blocks` is an `nn.ModuleList` (timm builds an `nn.Sequential` of the same blocks), and
  `forward(x, register_blk=-1)` runs them one by one and returns the normalised tokens.
* Grad-CAM: with `register_blk=i`, block i computes its attention explicitly (timm's unfused
  path) and a forward hook of ours on that block's `attn.attn_drop` stores the attention
  probabilities as `blocks[i].attn.attention_map` and, through a tensor hook, their gradient as
  `blocks[i].attn.attn_gradients`. Every other block keeps the fused attention kernel.
* Gradient checkpointing is timm's switch, `set_grad_checkpointing()`: while training with
  gradients enabled every block but the Grad-CAM one recomputes its activations in backward.
* Weights are initialised as the original ALBEF code does (truncated normal, std 0.02, for the
  position embedding, the [CLS] token and every Linear; zero biases; unit LayerNorms).
"""
from contextlib import contextmanager
from functools import partial

import torch
import torch.utils.checkpoint
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import vision_transformer as timm_vit
from torch import nn

import utils

DEIT_BASE_URL = 'https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth'


@contextmanager
def capture_attention(attn):
    """Within the block, `attn` (a timm Attention) computes its attention probabilities explicitly;
    they are stored as `attn.attention_map` and their gradient, once backward reaches them, as
    `attn.attn_gradients`. The hook is removed and the fused kernel restored on exit."""
    def save_gradient(grad):
        attn.attn_gradients = grad

    def save_map(module, args, probs):  # the output of attn_drop: the probabilities used for attn @ v
        attn.attention_map = probs
        if probs.requires_grad:
            probs.register_hook(save_gradient)

    fused = attn.fused_attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(save_map)
    try:
        yield attn
    finally:
        handle.remove()
        attn.fused_attn = fused


class VisionTransformer(timm_vit.VisionTransformer):
    """timm's ViT without a classification head; returns all N = 1 + patches tokens, normalised.
    RGB input; every dropout and drop-path rate 0, as in ALBEF; LayerNorm eps 1e-6."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.,
                 qkv_bias=True):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=3, num_classes=0, global_pool='',
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, class_token=True, pos_drop_rate=0., proj_drop_rate=0.,
                         attn_drop_rate=0., drop_path_rate=0., weight_init='skip',
                         norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.blocks = nn.ModuleList(self.blocks)
        for blk in self.blocks:
            blk.attn.attention_map = blk.attn.attn_gradients = None
        if self.pos_embed.device.type != 'meta':
            trunc_normal_(self.pos_embed, std=.02)
            trunc_normal_(self.cls_token, std=.02)
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, x, register_blk=-1):
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for i, blk in enumerate(self.blocks):
            if i == register_blk:
                with capture_attention(blk.attn):
                    x = blk(x)
            elif self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def forward_features(self, x):
        """timm's name for the token features: here the same as `forward(x)`."""
        return self.forward(x)


def interpolate_pos_embed(pos_embed_checkpoint, visual_encoder):
    """Resize a checkpoint's position embedding to the patch grid of `visual_encoder`, as the
    original does: bicubic, align_corners=False, no antialiasing, the [CLS] entry kept as it is.
    Returns the input unchanged when the grids already agree."""
    num_patches = visual_encoder.patch_embed.num_patches
    num_extra_tokens = visual_encoder.pos_embed.shape[-2] - num_patches
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
    new_size = tuple(visual_encoder.patch_embed.grid_size)
    if (orig_size, orig_size) == new_size:
        return pos_embed_checkpoint
    resized = resample_abs_pos_embed(pos_embed_checkpoint, new_size=new_size, old_size=(orig_size, orig_size),
                                     num_prefix_tokens=num_extra_tokens, interpolation='bicubic',
                                     antialias=False, align_corners=False)
    utils.print0(f'reshape position embedding from {orig_size ** 2} to {num_patches}')
    return resized


def load_deit(visual_encoder, path_or_url=DEIT_BASE_URL):
    """Initialise `visual_encoder` from a DeiT checkpoint (local file or URL), resizing pos_embed.

    The classification head of DeiT is ignored; any other mismatch is an error.
    """
    if str(path_or_url).startswith(('http://', 'https://')):
        checkpoint = torch.hub.load_state_dict_from_url(path_or_url, map_location='cpu', check_hash=True)
    else:
        checkpoint = torch.load(path_or_url, map_location='cpu', weights_only=True)
    state_dict = dict(checkpoint.get('model', checkpoint))
    state_dict['pos_embed'] = interpolate_pos_embed(state_dict['pos_embed'], visual_encoder)
    result = visual_encoder.load_state_dict(state_dict, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith('head.')]
    if result.missing_keys or unexpected:
        raise ValueError(f'{path_or_url} is not a matching DeiT checkpoint: missing {result.missing_keys}, '
                         f'unexpected {unexpected}')
    utils.print0(f'initialised the ViT from {path_or_url}')
    return result
