"""BERT with ALBEF's fusion layers (docs/DESIGN.md, "Text and fusion encoder (BERT with cross-attention)").

One stack of `num_hidden_layers` layers serves as text encoder, multimodal (fusion) encoder, or
both, chosen per call with `mode`:

    'text'         layers [0, fusion_layer)                 self-attention only
    'fusion'       layers [fusion_layer, num_hidden_layers) self-attention + cross-attention
    'multi_modal'  all layers

Layers from `config.fusion_layer` on carry a cross-attention block over the image tokens. When
`encoder_hidden_states` is a list (NLVR2 image pairs), layer n attends to element
(n - fusion_layer) % len(list).

The modules are plain `nn.Module`s with the state_dict names of the original (and of HF BERT), so
the released checkpoints load unchanged. `transformers` provides only `BertConfig` and, in
`from_pretrained`, the weight files; no transformers release can change what these modules compute.
"""
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig

import utils

__all__ = ['BertConfig', 'BertModel', 'BertForMaskedLM', 'BertLMHeadModel', 'ModelOutput']

MODES = ('text', 'fusion', 'multi_modal')


@dataclass
class ModelOutput:
    """Model output: attribute access, and `out[0]` is the first field that is set."""
    last_hidden_state: Optional[torch.Tensor] = None
    pooler_output: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None

    def to_tuple(self):
        return tuple(v for v in (self.logits, self.last_hidden_state, self.pooler_output,
                                 self.hidden_states, self.attentions, self.cross_attentions)
                     if v is not None)

    def __getitem__(self, i):
        if isinstance(i, str):
            return getattr(self, i)
        return self.to_tuple()[i]


def _act(name):
    if name == 'gelu':
        return nn.GELU()  # exact erf form, as BERT's original 'gelu'
    if name == 'gelu_new':
        return nn.GELU(approximate='tanh')
    if name == 'relu':
        return nn.ReLU()
    raise ValueError(f"unsupported hidden_act {name!r} (expected 'gelu', 'gelu_new' or 'relu')")


class BertEmbeddings(nn.Module):
    """LayerNorm(word + token_type + position), then dropout."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # persistent, so `...embeddings.position_ids` is in every checkpoint, as in the original
        self.register_buffer('position_ids', torch.arange(config.max_position_embeddings).expand((1, -1)))

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        if position_ids is None:
            position_ids = self.position_ids[:, :input_ids.shape[1]]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class Packing:
    """The non-padding tokens of a (B, L) batch kept flat, (N, width), between and inside the
    layers, so every linear layer skips the padding; only attention sees the padded (B, L) layout.

    Outputs at the real tokens are unchanged (padded keys get exactly zero attention weight and
    nothing reads a padded token's output); hidden states at padding positions come back as zeros.
    Finding the N real tokens reads the mask on the host, so it is used where that costs nothing:
    in training, with the mask on the CPU (the loader's copy, for a model on a GPU: `device` is
    then where the index goes, copied from pinned memory without the host waiting).
    """

    def __init__(self, mask, device=None):
        self.batch, self.length = mask.shape
        self.index = mask.flatten().nonzero().squeeze(1)
        if device is not None and torch.device(device) != self.index.device:
            pinned = self.index.pin_memory() if torch.device(device).type == 'cuda' else self.index
            self.index = pinned.to(device, non_blocking=True)

    def pack(self, x):  # (B, L, D) -> (N, D)
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x):  # (N, D) -> (B, L, D), zeros at the padding
        out = x.new_zeros(self.batch * self.length, x.size(-1))
        return out.index_copy(0, self.index, x).view(self.batch, self.length, -1)

    def locate(self, positions):
        """The packed rows of flat (B*L) positions of real tokens (a padding position gives -1: an
        index error). Built on the index's device from the index alone: nothing is read back."""
        if getattr(self, '_inverse', None) is None:
            count = torch.arange(self.index.numel(), device=self.index.device)
            self._inverse = count.new_full((self.batch * self.length,), -1).index_copy(0, self.index, count)
        return self._inverse.index_select(0, positions)


def grouped_attention(query, key, value, attention_mask, index):
    """Cross-attention of query rows p to keys and values index[p], without copying them per row.

    query (P, H, L, d); key, value (U, H, N, d); attention_mask None or (U, 1, 1, N) additive;
    index (P,). Attention rows do not interact, so the rows of all texts of image u are stacked
    into one long query sequence (U, H, G*L, d) that reads image u's keys once; groups shorter than
    the largest, G, are padded with zero rows whose outputs are dropped. Used without gradients
    (retrieval re-ranking, where a pass scores hundreds of texts per image).
    """
    P, H, L, d = query.shape
    U = key.size(0)
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=U)
    G = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    sorted_index = index[order]
    slot = torch.arange(P, device=index.device) - starts[sorted_index]  # place within the group
    grouped = query.new_zeros(U, G, H, L, d)
    grouped[sorted_index, slot] = query[order]
    grouped = grouped.permute(0, 2, 1, 3, 4).reshape(U, H, G * L, d)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask)
    out = out.view(U, H, G, L, d).permute(0, 2, 1, 3, 4)[sorted_index, slot]  # (P, H, L, d) in sorted order
    result = torch.empty_like(out)
    result[order] = out
    return result


class BertSelfAttention(nn.Module):
    """Multi-head attention. Cross-attention reads keys and values (width `encoder_width`) from the
    image tokens. With `save_attention` set on a cross-attention module, the post-softmax map and
    its gradient are kept for Grad-CAM
    (docs/DESIGN.md, "Grad-CAM capture in the cross-attention")."""

    def __init__(self, config, is_cross_attention=False):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f'hidden_size {config.hidden_size} is not a multiple of '
                             f'num_attention_heads {config.num_attention_heads}')
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = config.hidden_size
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(kv_width, self.all_head_size)
        self.value = nn.Linear(kv_width, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.is_cross_attention = is_cross_attention
        self.save_attention = False
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

    def _heads(self, x):  # (B, L, D) -> (B, H, L, D/H)
        return x.view(*x.shape[:2], self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def attend_selected(self, queries, source, attention_mask, index, packing=None):
        """Attention for single query tokens: queries (S, D) -> context (S, D), query s attending
        to the keys and values of row index[s] of `source` (U, K, width), or with `packing` of the
        packed rows (N, width) of a (U, K) batch. attention_mask: None, or additive (S, 1, 1, K),
        one per query. Keys and values are projected for every source row, queries only for the S
        tokens (see BertEncoder.forward's `output_positions`)."""
        key, value = self.key(source), self.value(source)
        if packing is not None:
            key, value = packing.unpack(key), packing.unpack(value)
        key, value = self._heads(key).index_select(0, index), self._heads(value).index_select(0, index)
        query = self.query(queries).view(-1, self.num_attention_heads, 1, self.attention_head_size)
        mask = attention_mask.to(query.dtype) if attention_mask is not None else None
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                 dropout_p=self.dropout.p if self.training else 0.0)
        return context.reshape(-1, self.all_head_size)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                output_attentions=False, encoder_index=None, packing=None):
        source = encoder_hidden_states if self.is_cross_attention else hidden_states
        if self.is_cross_attention:
            attention_mask = encoder_attention_mask
        query, key, value = self.query(hidden_states), self.key(source), self.value(source)
        if packing is not None:  # the projections ran on the real tokens only; attention needs (B, L)
            query = packing.unpack(query)
            if not self.is_cross_attention:
                key, value = packing.unpack(key), packing.unpack(value)
        query, key, value = self._heads(query), self._heads(key), self._heads(value)
        shape = query.shape[0], query.shape[2]  # (B, L)
        capture = self.save_attention and self.is_cross_attention
        if encoder_index is not None:
            # each image's keys and values are projected once, then shared by all its rows
            per_image_mask = attention_mask is None or attention_mask.size(0) == key.size(0)
            if per_image_mask and not (self.training or torch.is_grad_enabled() or capture or output_attentions):
                mask = attention_mask.to(query.dtype) if attention_mask is not None else None
                context = grouped_attention(query, key, value, mask, encoder_index)
                return context.transpose(1, 2).reshape(*shape, self.all_head_size), None
            # (index_select: its backward is an index_add, much cheaper than indexing's index_put)
            key, value = key.index_select(0, encoder_index), value.index_select(0, encoder_index)
            if attention_mask is not None and attention_mask.size(0) != query.size(0):
                attention_mask = attention_mask.index_select(0, encoder_index)

        if capture or output_attentions:
            # explicit path: the attention probabilities are needed as a tensor
            scores = query @ key.transpose(-1, -2) / math.sqrt(self.attention_head_size)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            if capture:
                self.save_attention_map(probs)
                if probs.requires_grad:
                    probs.register_hook(self.save_attn_gradients)
            context = self.dropout(probs) @ value
        else:
            probs = None
            mask = attention_mask.to(query.dtype) if attention_mask is not None else None
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask,
                dropout_p=self.dropout.p if self.training else 0.0)
        context = context.transpose(1, 2).reshape(*shape, self.all_head_size)
        if packing is not None:
            context = packing.pack(context)
        return context, probs


class BertSelfOutput(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual); used after attention and (as BertOutput) the FFN."""

    def __init__(self, config, in_features=None):
        super().__init__()
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertOutput(BertSelfOutput):
    def __init__(self, config):
        super().__init__(config, in_features=config.intermediate_size)


class BertAttention(nn.Module):
    def __init__(self, config, is_cross_attention=False):
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                output_attentions=False, encoder_index=None, packing=None):
        context, probs = self.self(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   output_attentions, encoder_index, packing)
        return self.output(context, hidden_states), probs


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _act(config.hidden_act)

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertLayer(nn.Module):
    """Self-attention, cross-attention (only from `fusion_layer` on), then the feed-forward block."""

    def __init__(self, config, layer_num):
        super().__init__()
        self.config = config
        self.layer_num = layer_num
        self.attention = BertAttention(config)
        self.has_cross_attention = layer_num >= config.fusion_layer
        if self.has_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                output_attentions=False, encoder_index=None, packing=None, selection=None):
        """`selection` (positions, rows): compute the outputs of those tokens only, (S, width); see
        _forward_selected."""
        if self.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError(f'layer {self.layer_num} has cross-attention: encoder_hidden_states '
                                 f"must be given (use mode='text' for the text encoder alone)")
            if isinstance(encoder_hidden_states, (list, tuple)):
                # NLVR2: the fusion layers alternate between the images of the pair
                i = (self.layer_num - self.config.fusion_layer) % len(encoder_hidden_states)
                encoder_hidden_states, encoder_attention_mask = encoder_hidden_states[i], encoder_attention_mask[i]
        if selection is not None:
            return self._forward_selected(hidden_states, attention_mask, encoder_hidden_states,
                                          encoder_attention_mask, encoder_index, packing, *selection)
        hidden_states, self_probs = self.attention(hidden_states, attention_mask,
                                                   output_attentions=output_attentions, packing=packing)
        cross_probs = None
        if self.has_cross_attention:
            hidden_states, cross_probs = self.crossattention(
                hidden_states, None, encoder_hidden_states, encoder_attention_mask, output_attentions,
                encoder_index, packing)
        layer_output = self.output(self.intermediate(hidden_states), hidden_states)
        return layer_output, self_probs, cross_probs

    def _forward_selected(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                          encoder_index, packing, positions, rows):
        """The layer's outputs (S, width) at S tokens only: `positions` index the rows of
        hidden_states as the layer holds them (flat (B*L) positions, or packed rows with
        `packing`), `rows` (S,) is each token's row b. Self-attention keys and values still come
        from every token; the query, both attention outputs and the feed-forward block run on the
        S tokens. Equal to the full layer's outputs at those tokens (a test)."""
        flat = hidden_states if packing is not None else hidden_states.flatten(0, 1)
        tokens = flat.index_select(0, positions)
        self_mask = attention_mask.index_select(0, rows) if attention_mask is not None else None
        context = self.attention.self.attend_selected(tokens, hidden_states, self_mask, rows, packing)
        tokens = self.attention.output(context, tokens)
        if self.has_cross_attention:
            image = rows if encoder_index is None else encoder_index.index_select(0, rows)
            mask = encoder_attention_mask
            if mask is not None:  # per image (indexed by encoder_index) or per row, as in forward
                if encoder_index is not None and mask.size(0) != rows_of(hidden_states, packing):
                    mask = mask.index_select(0, encoder_index)
                mask = mask.index_select(0, rows)
            context = self.crossattention.self.attend_selected(tokens, encoder_hidden_states, mask, image)
            tokens = self.crossattention.output(context, tokens)
        return self.output(self.intermediate(tokens), tokens), None, None


def rows_of(hidden_states, packing):
    """The number of rows B of a layer's input, (B, L, D) or packed."""
    return packing.batch if packing is not None else hidden_states.size(0)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def layer_range(self, mode):
        if mode == 'text':
            return 0, self.config.fusion_layer
        if mode == 'fusion':
            return self.config.fusion_layer, self.config.num_hidden_layers
        if mode == 'multi_modal':
            return 0, self.config.num_hidden_layers
        raise ValueError(f'unknown mode {mode!r}; expected one of {MODES}')

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                output_attentions=False, output_hidden_states=False, mode='multi_modal', encoder_index=None,
                packing=None, output_positions=None):
        """With `packing` (a Packing) the layers run on the real tokens only (see Packing). With
        `output_positions` (S,: flat positions in the (B, L) rows, real tokens only) the last layer
        computes those tokens' outputs alone, and last_hidden_state is (S, width): what a head
        reads at a few tokens ([CLS], the masked ones) costs the rest of the last layer nothing."""
        start, end = self.layer_range(mode)
        all_hidden, all_self, all_cross = [], [], []
        selection = None
        if output_positions is not None:
            rows = torch.div(output_positions, hidden_states.size(1), rounding_mode='floor')
            selection = (packing.locate(output_positions) if packing is not None else output_positions, rows)
            if start == end:  # no layer to reduce: the input itself, at those tokens
                return ModelOutput(last_hidden_state=hidden_states.flatten(0, 1).index_select(0, output_positions))
        if packing is not None:
            hidden_states = packing.pack(hidden_states)
        for i in range(start, end):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            args = (hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, output_attentions,
                    encoder_index, packing, selection if i == end - 1 else None)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                out = torch.utils.checkpoint.checkpoint(self.layer[i], *args, use_reentrant=False)
            else:
                out = self.layer[i](*args)
            hidden_states = out[0]
            if output_attentions:
                all_self.append(out[1])
                all_cross.append(out[2])
        if output_hidden_states:
            all_hidden.append(hidden_states)
        if packing is not None and selection is None:
            hidden_states = packing.unpack(hidden_states)
        return ModelOutput(last_hidden_state=hidden_states,
                          hidden_states=tuple(all_hidden) if output_hidden_states else None,
                          attentions=tuple(all_self) if output_attentions else None,
                          cross_attentions=tuple(all_cross) if output_attentions else None)


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = _act(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    """Decoder weight tied to the word embeddings; its bias is `bias`, aliased as `decoder.bias`."""

    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


def _check_config(config):
    for key in ('fusion_layer', 'encoder_width'):
        if not hasattr(config, key):
            raise ValueError(f'the BERT config has no {key!r}: ALBEF needs configs/config_bert.json '
                             f'(or a copy with {key!r} set)')


class BertPreTrainedModel(nn.Module):
    """Initialisation, `from_pretrained` and the small HF API surface the scripts use."""

    base_model_prefix = 'bert'

    def __init__(self, config):
        super().__init__()
        _check_config(config)
        self.config = config

    @property
    def base_model(self):
        return getattr(self, self.base_model_prefix, self)

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, BertLMPredictionHead):
            module.bias.data.zero_()

    def init_weights(self):
        if next(self.parameters()).device.type != 'meta':
            self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self):
        head = getattr(self, 'cls', None)
        if head is not None:
            head.predictions.decoder.weight = self.base_model.embeddings.word_embeddings.weight
            head.predictions.decoder.bias = head.predictions.bias

    def set_gradient_checkpointing(self, enable=True):
        self.base_model.encoder.gradient_checkpointing = enable

    @classmethod
    def from_pretrained(cls, name_or_path, config=None, **kwargs):
        """Build the model and load pretrained BERT weights (HF format) into it.

        `name_or_path` is a local directory or file, or a hub name such as 'bert-base-uncased'.
        Old `gamma`/`beta` LayerNorm names are mapped, the pooler (unless kept) and the
        next-sentence head are dropped; weights absent from the file (cross-attention, extra
        layers) keep their fresh initialisation. What was new is printed and kept in
        `model.loading_info`.
        """
        if config is None:
            config = BertConfig.from_pretrained(name_or_path)
        model = cls(config, **kwargs)
        state_dict = _read_pretrained_bert(name_or_path)
        state_dict = model._adapt_pretrained_keys(state_dict)
        own = model.state_dict()
        for key, value in state_dict.items():
            if key in own and own[key].shape != value.shape:
                raise ValueError(f'{name_or_path}: {key} has shape {tuple(value.shape)} but the model '
                                 f'expects {tuple(own[key].shape)}; does the BERT config match the weights?')
        result = model.load_state_dict(state_dict, strict=False)
        tied = {'cls.predictions.decoder.weight', 'cls.predictions.decoder.bias'}
        missing = [k for k in result.missing_keys if k not in tied]
        if result.unexpected_keys:
            raise ValueError(f'{name_or_path}: weights the model has no place for: {result.unexpected_keys[:10]}'
                             f'{" ..." if len(result.unexpected_keys) > 10 else ""}')
        model.tie_weights()
        model.loading_info = {'missing_keys': missing, 'unexpected_keys': []}
        if missing:
            utils.print0(f'{cls.__name__} from {name_or_path}: {len(missing)} weights newly initialised '
                  f'(cross-attention and layers beyond the checkpoint): '
                  f'{_summarise_keys(missing)}')
        return model

    def _adapt_pretrained_keys(self, state_dict):
        """Map an HF BERT state_dict (with or without the 'bert.' prefix) onto this model's names."""
        has_head = hasattr(self, 'cls')
        has_pooler = getattr(self.base_model, 'pooler', None) is not None
        out = {}
        for key, value in state_dict.items():
            key = key.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias')
            if key.startswith('cls.'):
                if key.startswith('cls.predictions.') and has_head:
                    out[key] = value
                continue  # next-sentence head, or an MLM head this model does not have
            key = key[len('bert.'):] if key.startswith('bert.') else key
            if key.startswith('pooler.') and not has_pooler:
                continue
            out[f'bert.{key}' if self.base_model is not self else key] = value
        return out


def _summarise_keys(keys, limit=6):
    prefixes = sorted({'.'.join(k.split('.')[:4]) for k in keys})
    return ', '.join(prefixes[:limit]) + (f' and {len(prefixes) - limit} more' if len(prefixes) > limit else '')


def _read_pretrained_bert(name_or_path):
    """Return the state_dict of an HF BERT checkpoint from a directory, a file or the hub."""
    candidates = ('model.safetensors', 'pytorch_model.bin')
    if os.path.isfile(name_or_path):
        path = name_or_path
    elif os.path.isdir(name_or_path):
        found = [os.path.join(name_or_path, c) for c in candidates if os.path.isfile(os.path.join(name_or_path, c))]
        if not found:
            raise FileNotFoundError(f'no {" or ".join(candidates)} in {name_or_path}')
        path = found[0]
    else:
        from huggingface_hub import hf_hub_download
        path, error = None, None
        for candidate in candidates:
            try:
                path = hf_hub_download(name_or_path, candidate)
                break
            except Exception as e:  # try the next file format
                error = e
        if path is None:
            raise OSError(f'could not load BERT weights {name_or_path!r}: not a local path, and the hub '
                          f'download failed ({error})')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location='cpu', weights_only=True)


class BertModel(BertPreTrainedModel):
    """The bare encoder. `encoder_embeds` feeds hidden states straight into the first layer of
    `mode` (ALBEF's ITM runs text-encoder outputs through the fusion layers that way).

    `pack_tokens` (class default True; set it on an instance to change one model): in training
    with the mask on the CPU, or with a `packing` built by the caller from a CPU copy of the mask
    (a model on a GPU), the linear layers run on the real tokens only (see Packing). False runs
    every token, padding included, through every layer (regional compilation sets it: one shape).
    """

    pack_tokens = True

    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def _capturing(self):
        """Whether a cross-attention layer keeps its attention map for Grad-CAM."""
        return any(layer.has_cross_attention and layer.crossattention.self.save_attention
                   for layer in self.encoder.layer)

    def get_extended_attention_mask(self, attention_mask, input_shape, device=None, is_decoder=False):
        """(B, L) or (B, L, L) 0/1 mask -> additive (B, 1, 1|L, L) mask with -10000 on masked keys."""
        if attention_mask.dim() == 3:
            extended = attention_mask[:, None, :, :]
        elif attention_mask.dim() == 2:
            if is_decoder:
                batch_size, seq_length = input_shape
                seq_ids = torch.arange(seq_length, device=attention_mask.device)
                causal = (seq_ids[None, None, :] <= seq_ids[None, :, None]).to(attention_mask.dtype)
                causal = causal.expand(batch_size, -1, -1)
                extended = causal[:, None, :, :] * attention_mask[:, None, None, :]
            else:
                extended = attention_mask[:, None, None, :]
        else:
            raise ValueError(f'attention_mask must have 2 or 3 dimensions, got shape {tuple(attention_mask.shape)}')
        extended = extended.to(dtype=self.dtype)
        return (1.0 - extended) * -10000.0

    def invert_attention_mask(self, encoder_attention_mask):
        """(B, N) or (B, Lq, N) 0/1 mask -> additive mask on the image tokens."""
        if encoder_attention_mask.dim() == 3:
            extended = encoder_attention_mask[:, None, :, :]
        else:
            extended = encoder_attention_mask[:, None, None, :]
        extended = extended.to(dtype=self.dtype)
        return (1.0 - extended) * (-1e4 if self.dtype == torch.float16 else -1e9)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                encoder_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, is_decoder=False,
                mode='multi_modal', encoder_index=None, packing=None, output_positions=None):
        """`encoder_index` (optional, B): row b attends to encoder_hidden_states[encoder_index[b]], so
        images shared by many texts (retrieval re-ranking) are projected once per layer. `packing`
        (optional, a Packing of the (B, L) rows, its index on the model's device): the tokens the
        linear layers run on in training, for a mask that is not on the CPU. `output_positions`
        (optional, S flat positions b * L + l of real tokens, on the model's device): only those
        tokens' outputs are wanted; last_hidden_state is then (S, width) and the last layer
        computes nothing else (unless attention maps or hidden states are asked for, or saved for
        Grad-CAM: then every layer runs whole and the S outputs are picked from it)."""
        if input_ids is not None:
            input_shape, device = input_ids.shape, input_ids.device
        elif encoder_embeds is not None:
            input_shape, device = encoder_embeds.shape[:2], encoder_embeds.device
        else:
            raise ValueError('give input_ids or encoder_embeds')
        if attention_mask is None:
            attention_mask = torch.ones(input_shape, device=device)
        extended_mask = self.get_extended_attention_mask(attention_mask, input_shape, device, is_decoder)

        if encoder_hidden_states is not None:
            if isinstance(encoder_hidden_states, (list, tuple)):
                if not isinstance(encoder_attention_mask, (list, tuple)) or \
                        len(encoder_attention_mask) != len(encoder_hidden_states):
                    raise ValueError('a list of encoder_hidden_states needs a list of encoder_attention_mask '
                                     'of the same length')
                encoder_mask = [self.invert_attention_mask(m) for m in encoder_attention_mask]
            else:
                # None attends to every image token (the same as an all-ones mask, without the mask)
                encoder_mask = None if encoder_attention_mask is None else self.invert_attention_mask(
                    encoder_attention_mask)
        else:
            encoder_mask = None

        if encoder_embeds is not None:
            embedding_output = encoder_embeds
        else:
            embedding_output = self.embeddings(input_ids, token_type_ids, position_ids)
        if encoder_index is not None and isinstance(encoder_hidden_states, (list, tuple)):
            raise ValueError('encoder_index cannot be combined with a list of encoder_hidden_states')
        if not (self.pack_tokens and self.training and attention_mask.dim() == 2
                and not (is_decoder or output_attentions or output_hidden_states or self._capturing())):
            packing = None
        elif packing is None and attention_mask.device.type == 'cpu':
            packing = Packing(attention_mask)
        if packing is not None and packing.index.numel() == attention_mask.numel():  # no padding to skip
            packing = None
        reduce = output_positions is not None and attention_mask.dim() == 2 and not (
            is_decoder or output_attentions or output_hidden_states or self._capturing())
        out = self.encoder(embedding_output, extended_mask, encoder_hidden_states, encoder_mask,
                           bool(output_attentions), bool(output_hidden_states), mode, encoder_index, packing,
                           output_positions if reduce else None)
        if output_positions is not None:
            if not reduce:
                out.last_hidden_state = out.last_hidden_state.flatten(0, 1).index_select(0, output_positions)
            out.pooler_output = None  # ([CLS] of every row is not among the outputs)
            return out if return_dict is not False else out.to_tuple()
        out.pooler_output = self.pooler(out.last_hidden_state) if self.pooler is not None else None
        return out if return_dict is not False else out.to_tuple()


class BertForMaskedLM(BertPreTrainedModel):
    """BERT with the language-model head over the vocabulary (`bert`, `cls`): ALBEF's MLM text
    encoder, and, as BertLMHeadModel (`is_decoder` True: causal self-attention), the VQA answer
    decoder. The losses are computed by the callers from the logits (models/losses.py)."""

    is_decoder = False

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                encoder_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, is_decoder=None,
                mode='multi_modal', return_logits=False):
        """Logits (B, L, vocab) in a ModelOutput. `return_logits` returns the logits tensor alone; a
        decoder's without the last position, which predicts past the end of the sequence."""
        is_decoder = self.is_decoder if is_decoder is None else is_decoder
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, encoder_embeds,
                        encoder_hidden_states, encoder_attention_mask, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states, return_dict=True, is_decoder=is_decoder,
                        mode=mode)
        logits = self.cls(out.last_hidden_state)
        if return_logits:
            return logits[:, :-1, :].contiguous() if is_decoder else logits
        result = ModelOutput(logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
                             cross_attentions=out.cross_attentions)
        return result if return_dict is not False else result.to_tuple()


class BertLMHeadModel(BertForMaskedLM):
    """The causal LM (the VQA answer decoder): BertForMaskedLM with `is_decoder` True."""

    is_decoder = True
