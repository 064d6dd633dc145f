"""The ViT image encoder of every ALBEF model (SPEC section 2).

The state_dict names are those of timm's ViT (`patch_embed.proj`, `blocks.i.{norm1,attn.qkv,
attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`), so DeiT and ALBEF checkpoints load unchanged. The
blocks are our own only because Grad-CAM needs the attention map of one block and its gradient
(`register_blk`); the patch embedding, MLP and initialisers come from timm.
"""
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_

DEIT_BASE_URL = 'https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth'


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attention_map = None
        self.attn_gradients = None

    def save_attn_gradients(self, attn_gradients):
        self.attn_gradients = attn_gradients

    def get_attn_gradients(self):
        return self.attn_gradients

    def save_attention_map(self, attention_map):
        self.attention_map = attention_map

    def get_attention_map(self):
        return self.attention_map

    def forward(self, x, register_hook=False):
        B, N, C = x.shape
        # (B, N, 3C) -> (3, B, heads, N, C/heads)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if register_hook:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            attn = self.attn_drop(attn)
            self.save_attention_map(attn)
            if attn.requires_grad:
                attn.register_hook(self.save_attn_gradients)
            x = attn @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                               scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x, register_hook=False):
        x = x + self.drop_path(self.attn(self.norm1(x), register_hook=register_hook))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT without a classification head; returns all N = 1 + patches tokens, normalised."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=True, qk_scale=None, representation_size=None,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0., norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or (lambda dim: nn.LayerNorm(dim, eps=1e-6))
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device='cpu')]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i],
                  norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.gradient_checkpointing = False
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

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    def forward(self, x, register_blk=-1):
        B = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed[:, :x.size(1), :])
        for i, blk in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and i != register_blk:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x, register_blk == i)
        return self.norm(x)


def interpolate_pos_embed(pos_embed_checkpoint, visual_encoder):
    """Resize a checkpoint's position embedding to the patch grid of `visual_encoder` (bicubic,
    extra tokens kept as they are). Returns the input unchanged when the grids already agree."""
    embedding_size = pos_embed_checkpoint.shape[-1]
    num_patches = visual_encoder.patch_embed.num_patches
    num_extra_tokens = visual_encoder.pos_embed.shape[-2] - num_patches
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
    new_size = int(num_patches ** 0.5)
    if orig_size == new_size:
        return pos_embed_checkpoint
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    # (1, orig*orig, C) -> (1, C, orig, orig) -> bicubic -> (1, new*new, C)
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode='bicubic', align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    print(f'reshape position embedding from {orig_size ** 2} to {new_size ** 2}')
    return torch.cat((extra_tokens, pos_tokens), dim=1)


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
    print(f'initialised the ViT from {path_or_url}')
    return result
