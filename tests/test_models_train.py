"""Tiny models of every variant: one training step gives finite losses and reaches every trainable
parameter; momentum parameters stay frozen; evaluation turns dropout off
(docs/DESIGN.md, "Momentum encoders and feature queues", "Downstream models")."""
import pytest
import torch

from conftest import VARIANTS

CAPTIONS = ['a red circle next to a very small blue square', 'a blue square on the left', 'green',
            'two small triangles and one big round circle']
ANSWERS = ['yes[SEP]', 'no[SEP]', 'red[SEP]', 'two[SEP]', 'blue square[SEP]']

# Parameters that, as in the original, legitimately receive no gradient in a training step (name prefix: reason).
# No other exemption is needed: every mode-selected BERT layer is reached (text layers by ITC, fusion layers
# by ITM/MLM, all layers in VQA/VE/NLVR), the tied MLM/LM heads by MLM or the answer loss, `temp` by ITC in
# pre-training and retrieval, and every exempt-free gradient must also be non-zero somewhere.
NO_GRAD = {
    'pretrain_nlvr': {
        'vision_proj.': 'used only under no_grad, to sample the negative images',
        'text_proj.': 'loaded from ALBEF.pth but unused by the TA loss',
        'temp': 'unused (the sampling uses the constant 0.07)',
    },
}


def _batch(tokenizer, variant, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(4, 3, 32, 32, generator=g)
    text = tokenizer(CAPTIONS, padding='longest', return_tensors='pt')
    if variant == 'nlvr':
        image = torch.cat([image, torch.randn(4, 3, 32, 32, generator=g)])
    return image, text


def _train_loss(model, variant, tokenizer, alpha=0.4):
    """One training forward; returns a dict of scalar losses."""
    image, text = _batch(tokenizer, variant)
    if variant == 'pretrain':
        return dict(zip(('mlm', 'ita', 'itm'), model(image, text, alpha)))
    if variant == 'retrieval':
        return dict(zip(('ita', 'itm'), model(image, text, alpha, torch.tensor([0, 1, 1, 2]))))
    if variant == 've':
        return {'ce': model(image, text, torch.tensor([0, 1, 2, 1]), alpha)}
    if variant == 'nlvr':
        return {'ce': model(image, text, torch.tensor([0, 1, 1, 0]), alpha)}
    if variant == 'pretrain_nlvr':
        return {'ta': model(image, text)}
    answer = tokenizer(ANSWERS, padding='longest', return_tensors='pt')
    return {'lm': model(image, text, answer, alpha, k=[1, 2, 1, 1], weights=torch.tensor([1., .5, .5, 1., 1.]))}


def _momentum_names(model):
    return {name for name, _ in model.named_parameters() if name.split('.')[0].endswith('_m')}


@pytest.mark.parametrize('variant', VARIANTS)
def test_training_step(make_model, tokenizer, variant):
    model = make_model(variant).train()
    torch.manual_seed(1)  # the MLM masking, the negative sampling and dropout
    losses = _train_loss(model, variant, tokenizer)
    for name, loss in losses.items():
        assert loss.dim() == 0 and torch.isfinite(loss), f'{variant} loss {name} = {loss}'
    sum(losses.values()).backward()

    exempt = NO_GRAD.get(variant, {})
    momentum = _momentum_names(model)
    assert bool(momentum) == (variant != 'pretrain_nlvr'), 'momentum encoders exist except in TA pre-training'
    params = dict(model.named_parameters())
    problems = []
    for name, param in params.items():
        if name in momentum:
            # frozen, and the twin of an online parameter of the same name
            if param.requires_grad or param.grad is not None:
                problems.append(f'{name}: momentum parameter with requires_grad or a gradient')
            online = name.split('.', 1)
            if not params['.'.join([online[0][:-2]] + online[1:])].requires_grad:
                problems.append(f'{name}: its online twin is not trainable')
            continue
        is_exempt = any(name == p or (p.endswith('.') and name.startswith(p)) for p in exempt)
        if is_exempt:
            if param.grad is not None:
                problems.append(f'{name}: has a gradient, but NO_GRAD says it gets none')
        elif param.grad is None:
            problems.append(f'{name}: no gradient')
        elif not torch.isfinite(param.grad).all():
            problems.append(f'{name}: non-finite gradient')
        elif not param.grad.abs().sum() > 0:
            problems.append(f'{name}: gradient is exactly zero')
    assert not problems, f'{variant}:\n' + '\n'.join(problems)


@pytest.mark.parametrize('variant', ['retrieval', 'vqa', 've', 'nlvr'])
def test_training_without_distillation(make_model, tokenizer, variant):
    """distill: False drops the momentum-distillation terms: the loss no longer depends on alpha,
    where with distillation it does."""
    model = make_model(variant, distill=False).train()
    has_momentum = bool(_momentum_names(model))
    assert has_momentum == (variant == 'retrieval')  # retrieval keeps them to fill the queues
    distilled = make_model(variant).train()
    losses = {}
    for name, m in (('plain', model), ('distilled', distilled)):
        for alpha in (0.0, 0.4):
            state = {k: v.clone() for k, v in m.state_dict().items()}
            torch.manual_seed(1)  # the same dropout masks and negatives for both alphas
            losses[name, alpha] = _train_loss(m, variant, tokenizer, alpha=alpha)
            m.load_state_dict(state)  # undo the momentum update and the queue writes of the forward
    for alpha in (0.0, 0.4):
        assert all(torch.isfinite(loss) for loss in losses['plain', alpha].values())
    for key, loss in losses['plain', 0.0].items():
        assert torch.equal(loss, losses['plain', 0.4][key]), key
    assert any(not torch.allclose(loss, losses['distilled', 0.4][key])
               for key, loss in losses['distilled', 0.0].items())


def _eval_outputs(model, variant, tokenizer):
    """What evaluation computes, as a list of tensors."""
    image, text = _batch(tokenizer, variant)
    if variant == 've':
        return [model(image, text, torch.tensor([0, 1, 2, 1]), train=False)]
    if variant == 'nlvr':
        return [model(image, text, torch.tensor([0, 1, 1, 0]), train=False)]
    if variant == 'vqa':
        answer = tokenizer(ANSWERS, padding='longest', return_tensors='pt')
        return list(model(image, text, answer, train=False, k=3))
    image_embeds = model.visual_encoder(image)
    bert = model.text_encoder.base_model
    text_embeds = bert(text.input_ids, attention_mask=text.attention_mask, mode='text').last_hidden_state
    if variant == 'pretrain_nlvr':
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        out = model.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                 encoder_hidden_states=[image_embeds, image_embeds.flip(0)],
                                 encoder_attention_mask=[atts, atts]).last_hidden_state
        return [image_embeds, model.ta_head(out[:, 0])]
    fused = bert(encoder_embeds=text_embeds, attention_mask=text.attention_mask,
                 encoder_hidden_states=image_embeds, mode='fusion').last_hidden_state
    outputs = [model.vision_proj(image_embeds[:, 0]), model.text_proj(text_embeds[:, 0]), model.itm_head(fused[:, 0])]
    if variant == 'pretrain':
        outputs.append(model.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                          encoder_hidden_states=image_embeds, return_logits=True))
    return outputs


@pytest.mark.parametrize('variant', VARIANTS)
def test_eval_turns_dropout_off(make_model, tokenizer, variant):
    """Eval mode computes what train mode computes with every dropout probability set to 0, whatever
    the RNG state; train mode with the configured dropout (0.1 in BERT) computes something else."""
    model = make_model(variant)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert any(m.p > 0 for m in dropouts)
    with torch.no_grad():
        torch.manual_seed(1)
        evaluated = _eval_outputs(model.eval(), variant, tokenizer)
        torch.manual_seed(1)
        with_dropout = _eval_outputs(model.train(), variant, tokenizer)
        for m in dropouts:
            m.p = 0.0  # the attention reads its dropout probability from this module too
        torch.manual_seed(2)
        reference = _eval_outputs(model.train(), variant, tokenizer)
    if variant == 'pretrain':  # the MLM logits: train mode packs the text tokens on the CPU (xbert
        # BertModel.pack_tokens), so its padded positions hold other values, which no loss reads
        real = _batch(tokenizer, variant)[1].attention_mask.bool()
        evaluated[-1], reference[-1], with_dropout[-1] = evaluated[-1][real], reference[-1][real], with_dropout[-1][real]
    for a, b in zip(evaluated, reference):
        assert torch.isfinite(a.float()).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # (packing reorders some sums)
    assert any(not torch.allclose(a.float(), b.float(), atol=1e-3) for a, b in zip(evaluated, with_dropout))
