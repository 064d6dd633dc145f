"""Numerical parity of the six ALBEF variants with an independent functional reference of the
original's computations (tests/reference_albef.py, written from the description
in docs/DESIGN.md).

For identical weights and inputs the encoder outputs (every mode), ITC features, ITM and MLM
logits, VQA ranking, VE/NLVR logits, training losses and the state after a training forward
(momentum weights, queues, queue_ptr, temp) must agree at float32 tolerance.

* The tiny models' weights are perturbed with random noise (biases and LayerNorm parameters
  included, and the momentum copies independently of the online weights), so that no term can
  hide behind a zero bias, a unit LayerNorm or an EMA of two identical tensors.
* Training forwards use a copy of the tiny BERT config with both dropout probabilities 0, so the
  only random draws are the samplings of the original model; the same `torch.manual_seed` before our
  forward and before the reference forward must then give the same negatives, masks and pairs.
* Evaluation outputs are compared with the stock tiny config (dropout 0.1) in eval mode, and with
  the dropout-free config in train mode.
"""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_albef as ref  # noqa: E402

from models import (model_nlvr, model_pretrain, model_pretrain_nlvr, model_retrieval,  # noqa: E402
                    model_ve, model_vqa)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BERT = os.path.join(ROOT, 'tests', 'fixtures', 'config_bert_tiny.json')
HP = ref.HParams(bert_heads=4, bert_eps=1e-12, fusion_layer=2, vit_heads=4, patch_size=8, vocab_size=30522)
TOL = dict(rtol=1e-5, atol=1e-5)
B = 4
TEXTS = ['a red circle', 'a man riding a brown horse on the beach next to the sea', 'green',
         'two small triangles above a blue square on the left']
ANSWERS = ['yes[SEP]', 'no[SEP]', 'red[SEP]', 'two small[SEP]', 'blue and green[SEP]', 'on the left[SEP]']


def model_config(bert_config):
    return dict(bert_config=bert_config, image_res=32, patch_size=8, vision_width=48, vision_depth=2,
                vision_num_heads=4, embed_dim=16, temp=0.07, mlm_probability=0.15, queue_size=16,
                momentum=0.995, distill=True, alpha=0.4)


@pytest.fixture(scope='module')
def configs(tmp_path_factory):
    """{'dropout': the stock tiny config (dropout 0.1), 'nodrop': both dropout probabilities 0}."""
    with open(TINY_BERT) as f:
        bert = json.load(f)
    bert.update(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    path = tmp_path_factory.mktemp('parity') / 'config_bert_tiny_nodrop.json'
    path.write_text(json.dumps(bert))
    return {'dropout': model_config(TINY_BERT), 'nodrop': model_config(str(path))}


@pytest.fixture(scope='module')
def text(tokenizer):
    out = tokenizer(TEXTS, padding='longest', return_tensors='pt')
    assert (out.attention_mask == 0).any(), 'the texts must need padding'
    return out


@pytest.fixture(scope='module')
def image():
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def build(module, cfg, tokenizer, seed=0, **overrides):
    """Our tiny model, seeded, with every floating weight perturbed (momentum copies separately).
    Returns (model, state) where state is a detached copy of its state_dict."""
    torch.manual_seed(seed)
    cfg = dict(cfg, **overrides)
    kwargs = {'init_deit': False} if module is model_pretrain else {}
    model = module.ALBEF(tokenizer=tokenizer, config=cfg, **kwargs)
    g = torch.Generator().manual_seed(seed + 1000)
    state = model.state_dict()
    new = {}
    for key, value in state.items():
        if value.is_floating_point() and key != 'temp' and 'queue' not in key:
            value = value + 0.2 * torch.randn(value.shape, generator=g)
        new[key] = value
    model.load_state_dict(new)
    return model, snapshot(model)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state(model, expected, momentum_prefixes=()):
    """Every state_dict entry equals the reference state at float32 tolerance. (The EMA results
    under `momentum_prefixes` were once held bit for bit, while our update kept the original's
    `m * theta_m + (1 - m) * theta` rounding order; it is now one torch._foreach_lerp_,
    theta_m + (1 - m) (theta - theta_m), so they are held to the float32 tolerance that bit-exact
    check stood for, tighter than TOL: a few units in the last place.)"""
    actual = model.state_dict()
    assert set(actual) == set(expected)
    for key, value in actual.items():
        tol = dict(rtol=1e-6, atol=1e-7) if key.startswith(momentum_prefixes) and value.is_floating_point() else TOL
        torch.testing.assert_close(value, expected[key], **tol, msg=lambda m: f'{key}: {m}')


def set_mode(model, train):
    model.train(train)
    return model


MODES = [pytest.param('dropout', False, id='eval'), pytest.param('nodrop', True, id='train-nodropout')]


# ------------------------------------------------------------------------------------------
# encoders
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('config_name,train', MODES)
def test_vit(configs, tokenizer, image, config_name, train):
    model, state = build(model_retrieval, configs[config_name], tokenizer)
    set_mode(model, train)
    with torch.no_grad():
        ours = model.visual_encoder(image)
    torch.testing.assert_close(ours, ref.vit_forward(state, 'visual_encoder.', image, HP), **TOL)


def test_vit_gradcam_path(configs, tokenizer, image):
    """register_blk: explicit attention, same output, the map of that block and its gradient."""
    model, state = build(model_retrieval, configs['dropout'], tokenizer)
    model.eval()
    expected, maps = ref.vit_forward(state, 'visual_encoder.', image, HP, return_attn=True)
    with torch.no_grad():
        default = model.visual_encoder(image)
    x = image.clone().requires_grad_(True)
    out = model.visual_encoder(x, register_blk=1)
    torch.testing.assert_close(out, default, **TOL)
    torch.testing.assert_close(out, expected, **TOL)
    attn = model.visual_encoder.blocks[1].attn
    assert model.visual_encoder.blocks[0].attn.attention_map is None
    torch.testing.assert_close(attn.attention_map, maps[1], **TOL)
    out[:, 0].sum().backward()
    grads = attn.attn_gradients
    assert grads is not None and grads.shape == maps[1].shape == (B, 4, 17, 17)


@pytest.mark.parametrize('config_name,train', MODES)
def test_bert_modes_and_mlm_logits(configs, tokenizer, text, config_name, train):
    model, state = build(model_pretrain, configs[config_name], tokenizer)
    set_mode(model, train)
    bert = model.text_encoder.bert
    P = 'text_encoder.bert.'
    ids, mask = text.input_ids, text.attention_mask
    L = ids.shape[1]
    g = torch.Generator().manual_seed(3)
    image_embeds = torch.randn(B, 17, 48, generator=g)
    text_embeds = torch.randn(B, L, 32, generator=g)
    image_mask = torch.ones(B, 17, dtype=torch.long)
    image_mask[1, 5:] = 0
    image_mask[3, :2] = 0
    mask3d = (torch.rand(B, L, L, generator=g) > 0.4).long() | torch.eye(L, dtype=torch.long)
    enc_mask3d = (torch.rand(B, L, 17, generator=g) > 0.3).long()
    enc_mask3d[..., 0] = 1
    with torch.no_grad():
        cases = {
            'text': (bert(ids, attention_mask=mask, mode='text').last_hidden_state,
                     ref.bert_forward(state, P, HP, ids, mask, mode='text')),
            'text-causal': (bert(ids, attention_mask=mask, mode='text', is_decoder=True).last_hidden_state,
                            ref.bert_forward(state, P, HP, ids, mask, mode='text', is_decoder=True)),
            'text-3d-mask': (bert(ids, attention_mask=mask3d, mode='text').last_hidden_state,
                             ref.bert_forward(state, P, HP, ids, mask3d, mode='text')),
            'fusion': (bert(encoder_embeds=text_embeds, attention_mask=mask, encoder_hidden_states=image_embeds,
                            encoder_attention_mask=image_mask, mode='fusion').last_hidden_state,
                       ref.bert_forward(state, P, HP, attention_mask=mask, encoder_embeds=text_embeds,
                                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                                        mode='fusion')),
            'fusion-3d-encoder-mask': (
                bert(encoder_embeds=text_embeds, attention_mask=mask, encoder_hidden_states=image_embeds,
                     encoder_attention_mask=enc_mask3d, mode='fusion').last_hidden_state,
                ref.bert_forward(state, P, HP, attention_mask=mask, encoder_embeds=text_embeds,
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=enc_mask3d, mode='fusion')),
            'fusion-default-encoder-mask': (
                bert(encoder_embeds=text_embeds, attention_mask=mask, encoder_hidden_states=image_embeds,
                     mode='fusion').last_hidden_state,
                ref.bert_forward(state, P, HP, attention_mask=mask, encoder_embeds=text_embeds,
                                 encoder_hidden_states=image_embeds, mode='fusion')),
            'multi_modal': (bert(ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=image_mask).last_hidden_state,
                            ref.bert_forward(state, P, HP, ids, mask, encoder_hidden_states=image_embeds,
                                             encoder_attention_mask=image_mask)),
            'mlm-logits': (model.text_encoder(ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                              encoder_attention_mask=image_mask, return_logits=True),
                           ref.mlm_logits(state, 'text_encoder.', HP, ids, mask,
                                          encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)),
        }
    for name, (ours, expected) in cases.items():
        if train and name not in ('text-3d-mask', 'text-causal'):  # those keep every token
            # training on the CPU skips padding tokens (xbert.Packing): their outputs, which no
            # loss reads, are zeros; every real token's output is the reference's
            real = mask.bool()
            if name != 'mlm-logits':  # (the head maps a zero state to its bias)
                assert (ours[~real] == 0).all(), name
            ours, expected = ours[real], expected[real]
        torch.testing.assert_close(ours, expected, **TOL, msg=lambda m: f'{name}: {m}')


def test_xbert_save_attention_path(configs, tokenizer, text):
    """save_attention on a cross-attention layer: explicit attention, same output, the post-softmax
    map (B, H, L, N) and its gradient
    (docs/DESIGN.md, "Grad-CAM capture in the cross-attention")."""
    model, state = build(model_retrieval, configs['dropout'], tokenizer)
    model.eval()
    encoder = model.text_encoder
    ids, mask = text.input_ids, text.attention_mask
    image_embeds = torch.randn(B, 17, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        default = encoder(ids, attention_mask=mask, encoder_hidden_states=image_embeds).last_hidden_state
    cross_probs = {}
    expected = ref.bert_forward(state, 'text_encoder.', HP, ids, mask, encoder_hidden_states=image_embeds,
                                cross_probs=cross_probs)
    layer = encoder.encoder.layer[3].crossattention.self
    layer.save_attention = True
    try:
        x = image_embeds.clone().requires_grad_(True)
        out = encoder(ids, attention_mask=mask, encoder_hidden_states=x).last_hidden_state
    finally:
        layer.save_attention = False
    torch.testing.assert_close(out, default, **TOL)
    torch.testing.assert_close(out, expected, **TOL)
    assert encoder.encoder.layer[2].crossattention.self.get_attention_map() is None
    torch.testing.assert_close(layer.get_attention_map(), cross_probs[3], **TOL)
    model.itm_head(out[:, 0])[:, 1].sum().backward()
    grads = layer.get_attn_gradients()
    assert grads is not None and grads.shape == cross_probs[3].shape == (B, 4, ids.shape[1], 17)


@pytest.mark.parametrize('module', [model_pretrain, model_retrieval], ids=['pretrain', 'retrieval'])
@pytest.mark.parametrize('config_name,train', MODES)
def test_itc_features_and_itm_logits(configs, tokenizer, image, text, module, config_name, train):
    model, state = build(module, configs[config_name], tokenizer)
    set_mode(model, train)
    bert = model.text_encoder.bert if module is model_pretrain else model.text_encoder
    prefix = 'text_encoder.bert.' if module is model_pretrain else 'text_encoder.'
    ids, mask = text.input_ids, text.attention_mask
    with torch.no_grad():
        image_embeds = model.visual_encoder(image)
        image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
        text_embeds = bert(ids, attention_mask=mask, mode='text').last_hidden_state
        text_feat = F.normalize(model.text_proj(text_embeds[:, 0]), dim=-1)
        shuffled = image_embeds[[2, 0, 3, 1]]
        fused = bert(encoder_embeds=text_embeds, attention_mask=mask, encoder_hidden_states=shuffled,
                     encoder_attention_mask=torch.ones(shuffled.shape[:2], dtype=torch.long),
                     mode='fusion').last_hidden_state
        itm = model.itm_head(fused[:, 0])
    r_image_embeds, r_image_feat, r_text_embeds, r_text_feat = ref.unimodal_features(
        state, '', prefix, HP, image, ids, mask)
    torch.testing.assert_close(image_feat, r_image_feat, **TOL)
    torch.testing.assert_close(text_feat, r_text_feat, **TOL)
    torch.testing.assert_close(itm, ref.itm_logits(state, prefix, HP, r_text_embeds, mask, r_image_embeds[[2, 0, 3, 1]]),
                               **TOL)


# ------------------------------------------------------------------------------------------
# training forwards: losses and the state after the forward
# ------------------------------------------------------------------------------------------
MOMENTUM_PREFIXES = ('visual_encoder_m.', 'vision_proj_m.', 'text_encoder_m.', 'text_proj_m.',
                     'text_decoder_m.', 'cls_head_m.')


def test_pretrain_forward(configs, tokenizer, image, text):
    """Two steps (the second reads the queues and queue_ptr the first wrote); temp 0.6 is clamped
    to 0.5; queue_ptr 12 of 16 wraps to 0."""
    model, state = build(model_pretrain, configs['nodrop'], tokenizer)
    with torch.no_grad():
        model.temp.fill_(0.6)
        model.queue_ptr.fill_(12)
    model.train()
    state = snapshot(model)
    ids, mask = text.input_ids, text.attention_mask
    for step, (seed, alpha) in enumerate([(11, 0.4), (12, 0.25)]):
        torch.manual_seed(seed)
        ours = model(image, text, alpha=alpha)
        torch.manual_seed(seed)
        expected, state, info = ref.pretrain_forward(state, HP, image, ids, mask, alpha, momentum=0.995,
                                                     queue_size=16, mlm_probability=0.15)
        assert (info['mlm_labels'] != -100).any(), 'pick a seed that masks at least one token'
        for name, a, b in zip(('loss_mlm', 'loss_ita', 'loss_itm'), ours, expected):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f'step {step} {name}: {m}')
        assert_state(model, state, MOMENTUM_PREFIXES)
    assert model.temp.item() == 0.5 and int(model.queue_ptr) == 4


@pytest.mark.parametrize('distill', [True, False])
def test_retrieval_forward(configs, tokenizer, image, text, distill):
    """Image-identity positives (in the batch and, at step 2, in the queue), same-image negatives
    excluded, no temp clamp."""
    model, state = build(model_retrieval, configs['nodrop'], tokenizer, distill=distill)
    with torch.no_grad():
        model.temp.fill_(0.6)
        model.queue_ptr.fill_(12)
    model.train()
    state = snapshot(model)
    ids, mask = text.input_ids, text.attention_mask
    for step, (seed, idx) in enumerate([(21, [0, 1, 1, 2]), (22, [3, 0, 4, 3])]):
        idx = torch.tensor(idx)
        torch.manual_seed(seed)
        ours = model(image, text, 0.4, idx)
        torch.manual_seed(seed)
        expected, state, _ = ref.retrieval_forward(state, HP, image, ids, mask, 0.4, idx, momentum=0.995,
                                                   queue_size=16, distill=distill)
        for name, a, b in zip(('loss_ita', 'loss_itm'), ours, expected):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f'step {step} {name}: {m}')
        assert_state(model, state, MOMENTUM_PREFIXES)
    assert model.temp.item() == pytest.approx(0.6) and int(model.queue_ptr) == 4
    assert model.idx_queue[0, :4].tolist() == [3, 0, 4, 3] and model.idx_queue[0, 12:].tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize('distill', [True, False])
def test_vqa_train_forward(configs, tokenizer, image, text, distill):
    model, state = build(model_vqa, configs['nodrop'], tokenizer, distill=distill)
    model.train()
    answers = tokenizer(ANSWERS[:5], padding='longest', return_tensors='pt')
    k = [1, 2, 1, 1]
    weights = torch.tensor([1.0, 0.5, 0.5, 1.0, 0.3])
    ours = model(image, text, answers, 0.4, k=k, weights=weights)
    expected, state = ref.vqa_train_forward(state, HP, image, text.input_ids, text.attention_mask,
                                            answers.input_ids, answers.attention_mask, k, weights, 0.4, distill)
    torch.testing.assert_close(ours, expected, **TOL)
    assert_state(model, state, MOMENTUM_PREFIXES)


@pytest.mark.parametrize('config_name,train', MODES)
def test_vqa_rank_answer(configs, tokenizer, image, text, config_name, train):
    model, state = build(model_vqa, configs[config_name], tokenizer)
    set_mode(model, train)
    answers = tokenizer(ANSWERS, padding='longest', return_tensors='pt')
    with torch.no_grad():
        ids, probs = model(image, text, answers, train=False, k=3)
    r_ids, r_probs = ref.vqa_rank_answer(state, HP, image, text.input_ids, text.attention_mask,
                                         answers.input_ids, answers.attention_mask, 3)
    assert torch.equal(ids, r_ids)
    torch.testing.assert_close(probs, r_probs, **TOL)


CLASSIFIERS = [pytest.param(model_ve, False, [0, 1, 2, 1], id='ve'),
               pytest.param(model_nlvr, True, [0, 1, 1, 0], id='nlvr')]


def classifier_image(image, pair):
    return torch.cat([image, image.flip(0) * 0.5]) if pair else image


@pytest.mark.parametrize('module,pair,targets', CLASSIFIERS)
@pytest.mark.parametrize('config_name,train', MODES)
def test_classifier_logits(configs, tokenizer, image, text, module, pair, targets, config_name, train):
    model, state = build(module, configs[config_name], tokenizer)
    set_mode(model, train)
    img = classifier_image(image, pair)
    targets = torch.tensor(targets)
    with torch.no_grad():
        ours = model(img, text, targets, train=False)
    torch.testing.assert_close(ours, ref.classifier_logits(state, HP, '', img, text.input_ids, text.attention_mask,
                                                           pair), **TOL)


@pytest.mark.parametrize('module,pair,targets', CLASSIFIERS)
@pytest.mark.parametrize('distill', [True, False])
def test_classifier_train_forward(configs, tokenizer, image, text, module, pair, targets, distill):
    model, state = build(module, configs['nodrop'], tokenizer, distill=distill)
    model.train()
    img = classifier_image(image, pair)
    targets = torch.tensor(targets)
    for alpha in (0.4, 0.1):
        ours = model(img, text, targets, alpha=alpha)
        expected, state = ref.classifier_train_forward(state, HP, img, text.input_ids, text.attention_mask,
                                                       targets, alpha, pair, distill)
        torch.testing.assert_close(ours, expected, **TOL)
        assert_state(model, state, MOMENTUM_PREFIXES)


def test_text_assignment_forward(configs, tokenizer, image, text):
    model, state = build(model_pretrain_nlvr, configs['nodrop'], tokenizer)
    model.train()
    seen = set()
    for seed in (31, 32, 33):
        torch.manual_seed(seed)
        ours = model(image, text)
        torch.manual_seed(seed)
        expected, labels = ref.ta_forward(state, HP, image, text.input_ids, text.attention_mask)
        torch.testing.assert_close(ours, expected, **TOL)
        seen.update(labels.tolist())
    assert seen == {0, 1, 2}, 'the seeds should exercise all three kinds of pair'
    assert_state(model, state)
