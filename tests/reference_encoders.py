"""An independent, functional reference of what the ORIGINAL ALBEF computes: the encoders and
their heads (ViT, BERT with fusion layers, the MLM head and losses). tests/reference_albef.py builds
the training and task forwards on them (docs/DESIGN.md, "Image encoder (ViT)" to "Downstream models").

Every function takes a state_dict (a plain dict of tensors, keys exactly as in the models'
`state_dict()`) plus inputs, and recomputes the result with explicit tensor operations written
from the description in docs/DESIGN.md, not from our modules:

* attention is matmul -> (+ additive mask) -> softmax -> matmul, with the self-attention mask
  (1 - m) * -10000 (`get_extended_attention_mask`; docs/DESIGN.md, "Attention masks") and the encoder mask
  (1 - m) * -1e9 (fp32 `invert_attention_mask` of transformers 4.8.1);
* LayerNorm is F.layer_norm with the given eps (BERT 1e-12, ViT 1e-6), GELU is the exact erf form;
* Linear layers are `x @ W.T + b`, the ViT patch embedding is an unfold + matmul;
* the random draws of the training forwards (ITM negatives, MLM masking, TA pairs) are made in
  the original's order on the CPU generator, so the same `torch.manual_seed` before our forward
  and before the reference forward must give the same samples. Dropout is not modelled: compare
  with dropout probability 0 (or in eval mode).

Nothing here imports `models`; the only shared convention is the state_dict key layout.
Training forwards also return `new_state`, the full state_dict after the forward (momentum EMA
applied, queues and queue_ptr written, `temp` clamped): pre-training and retrieval return
`(losses, new_state, info)` with the samples drawn in `info`; VQA and VE/NLVR `(loss, new_state)`;
the text-assignment forward `(loss, labels)` (it changes no state).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SELF_ATTENTION_MASK_VALUE = -10000.0   # get_extended_attention_mask: additive (1 - m) * -10000
ENCODER_MASK_VALUE = -1e9              # invert_attention_mask in fp32 (transformers 4.8.1)
VIT_EPS = 1e-6
PAD_ID, CLS_ID, MASK_ID = 0, 101, 103


@dataclass
class HParams:
    """The hyper-parameters the state_dict does not determine."""
    bert_heads: int = 12
    bert_eps: float = 1e-12
    fusion_layer: int = 6
    vit_heads: int = 12
    patch_size: int = 16
    vocab_size: int = 30522   # the MLM random-word draw: randint(vocab_size) over the whole shape


# ------------------------------------------------------------------------------------------
# primitives
# ------------------------------------------------------------------------------------------
def linear(sd, name, x):
    return x @ sd[name + '.weight'].t() + sd[name + '.bias']


def layer_norm(sd, name, x, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[name + '.weight'], sd[name + '.bias'], eps)


def gelu(x):
    """Exact GELU: x * Phi(x) with the erf form of the normal CDF."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def split_heads(x, num_heads):  # (B, L, D) -> (B, H, L, D/H)
    B, L, D = x.shape
    return x.reshape(B, L, num_heads, D // num_heads).permute(0, 2, 1, 3)


def merge_heads(x):  # (B, H, L, d) -> (B, L, H*d)
    B, H, L, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, L, H * d)


def attention(q, k, v, num_heads, additive_mask=None, scale=None):
    """softmax(q k^T * scale + mask) v per head; returns (context (B, Lq, D), probs (B, H, Lq, Lk))."""
    q, k, v = (split_heads(t, num_heads) for t in (q, k, v))
    if scale is None:
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    else:
        scores = (q @ k.transpose(-1, -2)) * scale
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = torch.softmax(scores, dim=-1)
    return merge_heads(probs @ v), probs


def normalize(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def soft_cross_entropy(logits, targets):
    """mean over rows of -sum_cols log_softmax(logits) * targets."""
    return -(torch.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def hard_cross_entropy(logits, labels):
    """mean over rows of -log softmax(logits)[label]."""
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(1, labels.view(-1, 1)).mean()


def _num_indexed(sd, prefix):
    """Number of consecutive integer-indexed children `prefix{i}.` present in sd."""
    present = {k[len(prefix):].split('.', 1)[0] for k in sd if k.startswith(prefix)}
    n = 0
    while str(n) in present:
        n += 1
    return n


# ------------------------------------------------------------------------------------------
# ViT (docs/DESIGN.md, "Image encoder (ViT)")
# ------------------------------------------------------------------------------------------
def vit_forward(sd, prefix, image, hp, return_attn=False):
    """Patch embed, prepend cls, add pos_embed, pre-norm blocks, final norm. -> (B, N, D)."""
    p = hp.patch_size
    w = sd[prefix + 'patch_embed.proj.weight']            # (D, 3, p, p)
    B, C, H, W = image.shape
    # non-overlapping p x p patches in row-major order, each flattened as (c, i, j)
    patches = image.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)
    x = patches @ w.reshape(w.shape[0], -1).t() + sd[prefix + 'patch_embed.proj.bias']
    cls = sd[prefix + 'cls_token'].expand(B, -1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + sd[prefix + 'pos_embed'][:, :x.shape[1]]
    attn_maps = []
    for i in range(_num_indexed(sd, prefix + 'blocks.')):
        b = f'{prefix}blocks.{i}.'
        h = layer_norm(sd, b + 'norm1', x, VIT_EPS)
        D = h.shape[-1]
        qkv = linear(sd, b + 'attn.qkv', h)                 # (B, N, 3D): q | k | v
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
        ctx, probs = attention(q, k, v, hp.vit_heads, scale=(D // hp.vit_heads) ** -0.5)
        attn_maps.append(probs)
        x = x + linear(sd, b + 'attn.proj', ctx)
        h = layer_norm(sd, b + 'norm2', x, VIT_EPS)
        x = x + linear(sd, b + 'mlp.fc2', gelu(linear(sd, b + 'mlp.fc1', h)))
    x = layer_norm(sd, prefix + 'norm', x, VIT_EPS)
    return (x, attn_maps) if return_attn else x


# ------------------------------------------------------------------------------------------
# BERT with fusion layers (docs/DESIGN.md, "Text and fusion encoder (BERT with cross-attention)")
# ------------------------------------------------------------------------------------------
def self_attention_mask(attention_mask, is_decoder=False):
    """2-D (B, L) -> (B, 1, 1, L) [or (B, 1, L, L) with the causal mask multiplied in];
    3-D (B, L, L) -> (B, 1, L, L). Value (1 - m) * -10000."""
    m = attention_mask.float()
    if m.dim() == 3:
        ext = m[:, None, :, :]
    else:
        ext = m[:, None, None, :]
        if is_decoder:
            L = m.shape[1]
            i = torch.arange(L).view(L, 1)
            j = torch.arange(L).view(1, L)
            causal = (j <= i).float()                       # c[i, j] = 1[j <= i]
            ext = causal[None, None, :, :] * ext
    return (1.0 - ext) * SELF_ATTENTION_MASK_VALUE


def encoder_mask(mask):
    """invert_attention_mask: 2-D (B, N) -> (B, 1, 1, N), 3-D (B, Lq, N) -> (B, 1, Lq, N); (1 - m) * -1e9."""
    m = mask.float()
    ext = m[:, None, :, :] if m.dim() == 3 else m[:, None, None, :]
    return (1.0 - ext) * ENCODER_MASK_VALUE


def bert_embeddings(sd, prefix, input_ids, hp):
    """LayerNorm((word + token_type[0]) + position[:L])."""
    e = prefix + 'embeddings.'
    L = input_ids.shape[1]
    word = sd[e + 'word_embeddings.weight'][input_ids]
    token_type = sd[e + 'token_type_embeddings.weight'][0]           # token_type_ids default to zeros
    position = sd[e + 'position_embeddings.weight'][torch.arange(L)]
    return layer_norm(sd, e + 'LayerNorm', (word + token_type) + position, hp.bert_eps)


def bert_layer(sd, prefix, n, hidden, self_mask, enc_states, enc_masks, hp, fusion_layer, cross_probs=None):
    """Self-attention, cross-attention (layers >= fusion_layer), FFN; each with post-LayerNorm."""
    L = f'{prefix}encoder.layer.{n}.'
    a = L + 'attention.'
    ctx, _ = attention(linear(sd, a + 'self.query', hidden), linear(sd, a + 'self.key', hidden),
                       linear(sd, a + 'self.value', hidden), hp.bert_heads, self_mask)
    hidden = layer_norm(sd, a + 'output.LayerNorm', linear(sd, a + 'output.dense', ctx) + hidden, hp.bert_eps)
    if n >= fusion_layer:
        c = L + 'crossattention.'
        assert c + 'self.query.weight' in sd, f'layer {n} should have cross-attention'
        assert enc_states is not None, 'a cross-attention layer needs encoder states'
        if isinstance(enc_states, (list, tuple)):      # NLVR: alternate between the images
            i = (n - fusion_layer) % len(enc_states)
            states, mask = enc_states[i], enc_masks[i]
        else:
            states, mask = enc_states, enc_masks
        ctx, probs = attention(linear(sd, c + 'self.query', hidden), linear(sd, c + 'self.key', states),
                               linear(sd, c + 'self.value', states), hp.bert_heads, mask)
        if cross_probs is not None:
            cross_probs[n] = probs
        hidden = layer_norm(sd, c + 'output.LayerNorm', linear(sd, c + 'output.dense', ctx) + hidden, hp.bert_eps)
    else:
        assert L + 'crossattention.self.query.weight' not in sd, f'layer {n} should not have cross-attention'
    inter = gelu(linear(sd, L + 'intermediate.dense', hidden))
    return layer_norm(sd, L + 'output.LayerNorm', linear(sd, L + 'output.dense', inter) + hidden, hp.bert_eps)


def bert_forward(sd, prefix, hp, input_ids=None, attention_mask=None, encoder_embeds=None,
                 encoder_hidden_states=None, encoder_attention_mask=None, mode='multi_modal',
                 is_decoder=False, fusion_layer=None, cross_probs=None):
    """The bare BertModel (`prefix` = 'text_encoder.' or 'text_encoder.bert.'). Returns (B, L, D).

    mode 'text': layers [0, fusion); 'fusion': [fusion, n); 'multi_modal': [0, n).
    `encoder_embeds` replaces the embedding output as the input of the first layer run.
    A list of encoder states needs a list of masks (element-wise inverted).
    """
    fusion_layer = hp.fusion_layer if fusion_layer is None else fusion_layer
    num_layers = _num_indexed(sd, prefix + 'encoder.layer.')
    start, end = {'text': (0, fusion_layer), 'fusion': (fusion_layer, num_layers),
                  'multi_modal': (0, num_layers)}[mode]
    x = encoder_embeds if encoder_embeds is not None else bert_embeddings(sd, prefix, input_ids, hp)
    B, Lq = x.shape[:2]
    if attention_mask is None:
        attention_mask = torch.ones(B, Lq)
    self_mask = self_attention_mask(attention_mask, is_decoder)
    if encoder_hidden_states is None:
        enc_masks = None
    elif isinstance(encoder_hidden_states, (list, tuple)):
        enc_masks = [encoder_mask(m) for m in encoder_attention_mask]
    else:
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2])
        enc_masks = encoder_mask(encoder_attention_mask)
    for n in range(start, end):
        x = bert_layer(sd, prefix, n, x, self_mask, encoder_hidden_states, enc_masks, hp, fusion_layer, cross_probs)
    return x


def mlm_head(sd, head_prefix, bert_prefix, hidden, hp):
    """cls.predictions: dense -> GELU -> LayerNorm, then the decoder tied to the word embeddings
    plus the separate bias `cls.predictions.bias`. -> (B, L, V)."""
    t = head_prefix + 'predictions.'
    h = layer_norm(sd, t + 'transform.LayerNorm', gelu(linear(sd, t + 'transform.dense', hidden)), hp.bert_eps)
    return h @ sd[bert_prefix + 'embeddings.word_embeddings.weight'].t() + sd[t + 'bias']


def mlm_logits(sd, prefix, hp, input_ids, attention_mask, **kw):
    """BertForMaskedLM / BertLMHeadModel logits at `prefix` ('text_encoder.', 'text_decoder.' ...)."""
    hidden = bert_forward(sd, prefix + 'bert.', hp, input_ids, attention_mask, **kw)
    return mlm_head(sd, prefix + 'cls.', prefix + 'bert.', hidden, hp)


def mlm_loss(logits, labels, soft_labels=None, alpha=0.0):
    """Masked-LM loss: mean CE over labels != -100, mixed with the mean distillation CE over them."""
    valid = labels != -100
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    loss_ce = nll[valid].mean()
    if soft_labels is None:
        return loss_ce
    d = -(soft_labels * logp).sum(-1)
    return (1 - alpha) * loss_ce + alpha * d[valid].mean()


def lm_sequence_loss(logits, labels, soft_labels=None, alpha=0.0):
    """Answer-decoder loss with reduction='none': per sequence, the summed NLL of logits[:, :-1] against
    labels[:, 1:] (ignoring -100), mixed with the summed distillation CE over the same tokens."""
    shifted = logits[:, :-1]
    targets = labels[:, 1:]
    valid = (targets != -100).float()
    logp = torch.log_softmax(shifted, dim=-1)
    nll = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    loss = (nll * valid).sum(1)
    if soft_labels is None:
        return loss
    d = -(soft_labels * logp).sum(-1)
    return (1 - alpha) * loss + alpha * (d * valid).sum(1)
