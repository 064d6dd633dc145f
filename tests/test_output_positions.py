"""Computing only the outputs that are read (xbert `output_positions`): the last BERT layer run at a
few tokens gives the full layer's outputs and gradients there, in every layout (padded, packed
from the mask, packed by the caller), and a training step that uses it (the ITM head at [CLS],
the MLM head at the masked tokens) gives the losses and gradients of the full passes."""
import copy
import json

import pytest
import torch

from conftest import TINY_BERT_CONFIG, assert_same_state, assert_same_steps
from models import xbert
from models.xbert import Packing


def no_dropout_bert():
    with open(TINY_BERT_CONFIG) as f:
        bert = json.load(f)
    bert.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return bert


def rows_seen_by_last_layer(bert, mode):
    """A list that receives the number of tokens the feed-forward block of the last layer of `mode`
    runs on."""
    seen = []
    last = bert.encoder.layer_range(mode)[1] - 1
    bert.encoder.layer[last].intermediate.dense.register_forward_pre_hook(lambda m, a: seen.append(a[0].size(0)))
    return seen


@pytest.mark.parametrize('layout', ['padded', 'packed', 'caller-packing'])
@pytest.mark.parametrize('mode', ['fusion', 'fusion-image-mask', 'text'])
def test_last_layer_at_the_read_positions_equals_the_full_layer(make_model, tokenizer, layout, mode):
    bert = make_model('pretrain', bert_config=no_dropout_bert()).text_encoder.bert.train()
    text = tokenizer(['a red circle', 'two small blue squares on the left', 'green', 'one big yellow shape'],
                     padding='longest', return_tensors='pt')
    (batch, length), width = text.input_ids.shape, bert.config.hidden_size
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, length, width, generator=g).requires_grad_()
    kwargs = dict(encoder_embeds=embeds, attention_mask=text.attention_mask, mode=mode.split('-')[0],
                  return_dict=True)
    if mode.startswith('fusion'):
        kwargs.update(encoder_hidden_states=torch.randn(2, 5, bert.config.encoder_width, generator=g),
                      encoder_index=torch.tensor([1, 0, 1, 0]))
        if mode == 'fusion-image-mask':  # one per image, each hiding a different image token
            kwargs['encoder_attention_mask'] = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
    if layout == 'padded':
        bert.pack_tokens = False
    if layout == 'caller-packing':  # as a GPU step gets it: from the host, one row kept whole
        host = text.attention_mask.clone()
        host[2] = 1
        kwargs['packing'] = Packing(host, 'cpu')
    real = text.attention_mask.flatten().nonzero().squeeze(1)
    some = real[torch.randperm(real.numel(), generator=g)[:5]]
    # each row's [CLS], real tokens in any order, and position 0 again (a fixed-size index's padding)
    positions = torch.cat([torch.arange(batch) * length, some, torch.tensor([0, 0])])
    weights = torch.randn(positions.numel(), width, generator=g)

    full = bert(**kwargs).last_hidden_state.flatten(0, 1).index_select(0, positions)
    (full_grad,) = torch.autograd.grad((full * weights).sum(), embeds)
    seen = rows_seen_by_last_layer(bert, kwargs['mode'])
    reduced = bert(**kwargs, output_positions=positions).last_hidden_state
    (reduced_grad,) = torch.autograd.grad((reduced * weights).sum(), embeds)
    assert seen == [positions.numel()]  # the last layer ran on the read tokens alone
    assert reduced.shape == (positions.numel(), width)
    torch.testing.assert_close(reduced, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reduced_grad, full_grad, rtol=1e-5, atol=1e-6)


def test_saved_attention_maps_stay_whole_with_output_positions(make_model, tokenizer):
    """With a cross-attention map kept for Grad-CAM every layer runs whole: the map covers every
    token, and the outputs at the positions are still those of the full pass."""
    bert = make_model('pretrain', bert_config=no_dropout_bert()).text_encoder.bert.eval()
    text = tokenizer(['a red circle', 'two small blue squares'], padding='longest', return_tensors='pt')
    image = torch.randn(2, 5, bert.config.encoder_width)
    positions = torch.tensor([0, text.input_ids.size(1) + 2])
    kwargs = dict(attention_mask=text.attention_mask, encoder_hidden_states=image, return_dict=True)
    full = bert(text.input_ids, **kwargs).last_hidden_state.flatten(0, 1)[positions]
    attention = bert.encoder.layer[-1].crossattention.self
    attention.save_attention = True
    picked = bert(text.input_ids, **kwargs, output_positions=positions).last_hidden_state
    attention.save_attention = False
    assert attention.get_attention_map().shape == (2, bert.config.num_attention_heads, text.input_ids.size(1), 5)
    torch.testing.assert_close(picked, full, rtol=1e-5, atol=1e-6)


def full_passes(monkeypatch):
    """Every BERT call runs all its tokens through all its layers, the read outputs picked after:
    what the step computed before the last layer learned to skip the others."""
    forward = xbert.BertModel.forward

    def whole(self, *args, output_positions=None, **kwargs):
        out = forward(self, *args, **kwargs)
        if output_positions is not None:
            out.last_hidden_state = out.last_hidden_state.flatten(0, 1).index_select(0, output_positions)
        return out
    monkeypatch.setattr(xbert.BertModel, 'forward', whole)


def step(model, image, text, idx, seed):
    torch.manual_seed(seed)
    losses = model(image, text, alpha=0.4) if idx is None else model(image, text, 0.4, idx)
    sum(losses).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return [loss.detach() for loss in losses], grads


@pytest.mark.parametrize('variant,layout', [('pretrain', 'packed'), ('pretrain', 'padded-fixed-index'),
                                            ('retrieval', 'packed')])
def test_the_step_computing_only_what_it_reads_equals_the_full_passes(make_model, tokenizer, monkeypatch,
                                                                      variant, layout):
    """Two steps (the second reads the queues the first wrote): losses, gradients, momentum weights
    and queues of the step with the reduced last layers equal those of full passes."""
    model = make_model(variant, bert_config=no_dropout_bert()).train()
    if layout == 'padded-fixed-index':  # as under --compile: padding kept, a fixed-size MLM index
        model.mlm_positions = 12
        for module in model.modules():
            if isinstance(module, xbert.BertModel):
                module.pack_tokens = False
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(8, 3, 32, 32, generator=g)
    words = ['a red circle on the left', 'two blue squares', 'the small green triangle at the top', 'one shape']
    idx = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]) if variant == 'retrieval' else None
    for seed in range(2):
        text = tokenizer([words[i % 4] for i in range(8)], padding='longest', return_tensors='pt')
        ours, our_grads = step(model, image, text, idx, seed)
        with monkeypatch.context() as patch:
            full_passes(patch)
            theirs, their_grads = step(reference, image, text, idx, seed)
        assert_same_steps(ours, our_grads, theirs, their_grads, grad_atol=1e-6)
    assert_same_state(model, reference)
