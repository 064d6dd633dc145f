"""models/vit.py is timm's VisionTransformer configured as ALBEF's image encoder: the blocks are a
ModuleList, Grad-CAM's capture is a temporary hook, and gradient checkpointing is timm's switch."""
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from models.vit import VisionTransformer


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, **kwargs)


def test_it_is_timms_vit_without_a_head():
    vit = tiny_vit()
    assert isinstance(vit, TimmViT) and type(vit.blocks) is nn.ModuleList and len(vit.blocks) == 3
    keys = set(vit.state_dict())
    assert {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'norm.weight', 'blocks.2.attn.qkv.bias',
            'blocks.2.mlp.fc2.weight'} <= keys
    assert not any(k.startswith(('head', 'fc_norm', 'reg_token')) for k in keys)
    assert vit.blocks[0].norm1.eps == 1e-6 and vit.pos_embed.shape == (1, 17, 48)
    image = torch.randn(2, 3, 32, 32)
    out = vit(image)
    assert out.shape == (2, 17, 48)  # every token, after the final LayerNorm
    assert torch.equal(vit.forward_features(image), out)


def test_register_blk_captures_one_block_and_leaves_no_hook():
    vit = tiny_vit().eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = vit(image)
    x = image.clone().requires_grad_(True)
    out = vit(x, register_blk=2)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    attn = vit.blocks[2].attn
    probs = attn.attention_map
    assert probs.shape == (2, 4, 17, 17) and attn.attn_gradients is None
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 17))
    out[:, 0].sum().backward()
    assert attn.attn_gradients.shape == probs.shape and attn.attn_gradients.abs().sum() > 0
    assert vit.blocks[1].attn.attention_map is None
    # the hook is gone and the fused kernel is back
    assert not attn.attn_drop._forward_hooks and attn.fused_attn == vit.blocks[1].attn.fused_attn


def test_timms_grad_checkpointing_switch_recomputes_blocks_with_the_same_gradients():
    image = torch.randn(2, 3, 32, 32)
    grads, calls = [], []
    for enable in (False, True):
        vit = tiny_vit().train()
        vit.set_grad_checkpointing(enable)
        assert vit.grad_checkpointing is enable
        count = [0]
        vit.blocks[0].register_forward_pre_hook(lambda *args: count.__setitem__(0, count[0] + 1))
        vit(image).square().sum().backward()
        grads.append({n: p.grad for n, p in vit.named_parameters()})
        calls.append(count[0])
    assert calls == [1, 2]  # checkpointed: the block runs again in backward
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
