"""Known-answer unit tests of the model building blocks (docs/DESIGN.md, the
sections named above each group below, and "How the tests pin this behaviour").

Expected values are computed by hand or by an independent re-implementation written here, never
by calling the code under test a second time.
"""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY_BERT_CONFIG
from models import losses
from models.model_nlvr import share_cross_attention
from models.model_vqa import tile
from models.vit import VisionTransformer, interpolate_pos_embed
from models.xbert import BertConfig, BertForMaskedLM, BertLMHeadModel, BertModel


def tiny_bert_config(**overrides):
    config = BertConfig.from_json_file(TINY_BERT_CONFIG)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


# ---------------------------------------------------------------------------------------------------
# interpolate_pos_embed (docs/DESIGN.md, "Position-embedding interpolation")
# ---------------------------------------------------------------------------------------------------
def _cubic_weights(t, a=-0.75):
    """Keys' cubic convolution weights of the 4 neighbours (offsets -1, 0, 1, 2) at fraction t."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _bicubic_matrix(n_in, n_out):
    """(n_out, n_in) matrix of 1-D bicubic resampling, align_corners=False, edge-replicated."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = scale * (i + 0.5) - 0.5
        base = math.floor(src)
        for offset, w in zip((-1, 0, 1, 2), _cubic_weights(src - base)):
            m[i, min(max(base + offset, 0), n_in - 1)] += w
    return m


def _vit(img_size):
    return VisionTransformer(img_size=img_size, patch_size=16, embed_dim=8, depth=1, num_heads=2)


@pytest.mark.parametrize('img_size, n_in, n_out', [(256, 197, 257), (384, 257, 577)])
def test_interpolate_pos_embed_matches_separable_bicubic(img_size, n_in, n_out, capsys):
    torch.manual_seed(0)
    width = 768  # the ViT-B channel count; the function takes C from the checkpoint
    pos_embed = torch.randn(1, n_in, width)
    out = interpolate_pos_embed(pos_embed, _vit(img_size))
    assert out.shape == (1, n_out, width)
    assert torch.equal(out[:, :1], pos_embed[:, :1])  # the CLS row is kept as it is
    orig, new = math.isqrt(n_in - 1), math.isqrt(n_out - 1)
    assert f'reshape position embedding from {orig ** 2} to {new ** 2}' in capsys.readouterr().out

    # tokens are a row-major (h, w) grid; resample rows then columns with the 1-D bicubic matrix
    grid = pos_embed[0, 1:].double().numpy().reshape(orig, orig, width)
    m = _bicubic_matrix(orig, new)
    expected = np.einsum('ih,jw,hwc->ijc', m, m, grid).reshape(new * new, width)
    np.testing.assert_allclose(out[0, 1:].double().numpy(), expected, atol=1e-5, rtol=0)


def test_interpolate_pos_embed_keeps_a_constant_grid():
    pos_embed = torch.cat([torch.full((1, 1, 8), -3.0), torch.full((1, 196, 8), 0.25)], dim=1)
    out = interpolate_pos_embed(pos_embed, _vit(256))
    assert out.shape == (1, 257, 8)
    assert torch.equal(out[0, 0], torch.full((8,), -3.0))
    torch.testing.assert_close(out[0, 1:], torch.full((256, 8), 0.25), atol=1e-6, rtol=0)


def test_interpolate_pos_embed_same_size_is_identity():
    pos_embed = torch.randn(1, 577, 8)
    assert interpolate_pos_embed(pos_embed, _vit(384)) is pos_embed


# ---------------------------------------------------------------------------------------------------
# attention masks (docs/DESIGN.md, "Attention masks")
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_bert():
    torch.manual_seed(0)
    return BertModel(tiny_bert_config(), add_pooling_layer=False).eval()


def test_extended_attention_mask_padding(tiny_bert):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ext = tiny_bert.get_extended_attention_mask(mask, mask.shape, mask.device)
    assert ext.shape == (2, 1, 1, 4) and ext.dtype == torch.float32
    expected = torch.tensor([[0., 0., 0., -10000.], [0., 0., -10000., -10000.]])
    assert torch.equal(ext[:, 0, 0], expected)


def test_extended_attention_mask_causal_decoder(tiny_bert):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ext = tiny_bert.get_extended_attention_mask(mask, mask.shape, mask.device, is_decoder=True)
    assert ext.shape == (2, 1, 4, 4)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                allowed = j <= i and mask[b, j] == 1
                assert ext[b, 0, i, j].item() == (0.0 if allowed else -10000.0), (b, i, j)


def test_extended_attention_mask_3d(tiny_bert):
    mask = torch.tensor([[[1, 0], [1, 1]]])
    ext = tiny_bert.get_extended_attention_mask(mask, (1, 2), mask.device)
    assert ext.shape == (1, 1, 2, 2)
    assert torch.equal(ext[0, 0], torch.tensor([[0., -10000.], [0., 0.]]))


def test_invert_attention_mask(tiny_bert):
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    inv = tiny_bert.invert_attention_mask(mask)
    assert inv.shape == (2, 1, 1, 3) and inv.dtype == torch.float32
    assert torch.equal(inv[mask[:, None, None, :] == 1], torch.zeros(5))
    # fp32: -1e9 in transformers 4.8.1 (the dtype minimum in later versions); either is "minus infinity"
    assert inv[0, 0, 0, 2].item() <= -1e4
    inv3 = tiny_bert.invert_attention_mask(torch.tensor([[[1, 0, 1]] * 4]))
    assert inv3.shape == (1, 1, 4, 3)
    assert inv3[0, 0, 2, 0].item() == 0 and inv3[0, 0, 2, 1].item() <= -1e4


def test_padded_keys_do_not_change_real_positions(tiny_bert):
    ids = torch.tensor([[101, 2417, 6207, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    other = ids.clone()
    other[0, 3:] = torch.tensor([2048, 8870])
    with torch.no_grad():
        a = tiny_bert(ids, attention_mask=mask, mode='text').last_hidden_state
        b = tiny_bert(other, attention_mask=mask, mode='text').last_hidden_state
    torch.testing.assert_close(a[0, :3], b[0, :3], atol=1e-6, rtol=0)


def test_decoder_is_causal():
    torch.manual_seed(0)
    decoder = BertLMHeadModel(tiny_bert_config(fusion_layer=0, encoder_width=32)).eval()
    states = torch.randn(1, 5, 32)
    ids = torch.tensor([[101, 2417, 6207, 2048, 102]])
    later = ids.clone()
    later[0, 3] = 8870
    with torch.no_grad():
        a = decoder(ids, encoder_hidden_states=states).logits
        b = decoder(later, encoder_hidden_states=states).logits
    torch.testing.assert_close(a[0, :3], b[0, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(a[0, 3], b[0, 3])


# ---------------------------------------------------------------------------------------------------
# losses (docs/DESIGN.md, "Pre-training objectives", "Masked-LM head", "Answer decoder",
# "Visual entailment model")
# ---------------------------------------------------------------------------------------------------
def test_soft_cross_entropy_known_value():
    logits = torch.tensor([[1., 2., 3.], [0., 0., 0.]])
    targets = torch.tensor([[0., 0., 1.], [0.5, 0.5, 0.]])
    # row 0: -log softmax(3) = log(1 + e^-1 + e^-2); row 1: uniform over 3 -> log 3
    expected = (math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(3)) / 2
    assert losses.soft_cross_entropy(logits, targets).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.753109, abs=1e-6)


def test_itc_loss_known_value():
    sim_i2t = torch.tensor([[1., 2., 3.], [0., 0., 0.]])
    i2t_targets = torch.tensor([[0., 0., 1.], [0.5, 0.5, 0.]])
    sim_t2i = torch.tensor([[0., math.log(3.), 0.], [2., 0., 0.]])
    t2i_targets = torch.tensor([[0., 1., 0.], [1., 0., 0.]])
    i2t = (math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(3)) / 2
    # row 0: softmax(ln 3) = 3/5; row 1: softmax(2) = e^2 / (e^2 + 2)
    t2i = (-math.log(3 / 5) - math.log(math.exp(2) / (math.exp(2) + 2))) / 2
    loss = losses.itc_loss(sim_i2t, sim_t2i, i2t_targets, t2i_targets)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_distill_targets_known_value():
    sim_m = torch.tensor([[0., math.log(3.)]])  # softmax = [1/4, 3/4]
    hard = torch.tensor([[1., 0.]])
    out = losses.distill_targets(sim_m, hard, 0.4)
    torch.testing.assert_close(out, torch.tensor([[0.4 * 0.25 + 0.6, 0.4 * 0.75]]))


def _logits_labels(seed=0, shape=(2, 5, 7)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g)
    labels = torch.randint(shape[-1], shape[:2], generator=g)
    labels[0, 1] = labels[1, 0] = labels[1, 3] = -100
    soft = torch.softmax(torch.randn(*shape, generator=g), dim=-1)
    return logits, labels, soft


def _token_nll(logits, labels):
    """-log p(label) per position (0 where the label is -100), by hand."""
    logp = torch.log(torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True))
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll * (labels != -100)


def _token_distill(logits, soft):
    logp = torch.log(torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True))
    return -(soft * logp).sum(-1)


def test_plain_cross_entropy_known_value():
    # softmax([0, ln 3]) = [1/4, 3/4]
    loss = losses.mlm_loss(torch.tensor([[[0., math.log(3.)]]]), torch.tensor([[1]]))
    assert loss.item() == pytest.approx(-math.log(0.75), abs=1e-6)


def test_mlm_loss():
    logits, labels, soft = _logits_labels()
    valid = labels != -100
    ce = F.cross_entropy(logits.view(-1, 7), labels.view(-1))  # mean over the labelled positions
    assert ce.item() == pytest.approx((_token_nll(logits, labels).sum() / valid.sum()).item(), abs=1e-6)
    torch.testing.assert_close(losses.mlm_loss(logits, labels), ce)
    torch.testing.assert_close(losses.mlm_loss(logits, labels, soft, alpha=0), ce)
    distill = (_token_distill(logits, soft) * valid).sum() / valid.sum()
    torch.testing.assert_close(losses.mlm_loss(logits, labels, soft, alpha=0.4), 0.6 * ce + 0.4 * distill)


def test_lm_loss_per_sequence_sum():
    logits, labels, soft = _logits_labels()
    shifted, targets = logits[:, :-1], labels[:, 1:]
    nll = _token_nll(shifted, targets).sum(1)  # (B,): -100 labels contribute nothing
    out = losses.lm_loss(logits, labels, reduction='none')
    assert out.shape == (2,)
    torch.testing.assert_close(out, nll)
    ce = F.cross_entropy(shifted.reshape(-1, 7), targets.reshape(-1), reduction='none').view(2, -1).sum(1)
    torch.testing.assert_close(out, ce)
    soft = soft[:, :-1]
    torch.testing.assert_close(losses.lm_loss(logits, labels, soft, alpha=0, reduction='none'), nll)
    distill = (_token_distill(shifted, soft) * (targets != -100)).sum(1)
    torch.testing.assert_close(losses.lm_loss(logits, labels, soft, alpha=0.4, reduction='none'),
                               0.6 * nll + 0.4 * distill)


def test_lm_loss_ignores_minus_100():
    logits, labels, _ = _logits_labels()
    changed = logits.clone()
    changed[0, 0] += 5.0  # predicts labels[0, 1], which is -100
    torch.testing.assert_close(losses.lm_loss(changed, labels, reduction='none')[0],
                               losses.lm_loss(logits, labels, reduction='none')[0])


def test_classification_distill_loss():
    g = torch.Generator().manual_seed(0)
    pred, pred_m = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    targets = torch.tensor([0, 2, 1, 2])
    ce = _token_nll(pred, targets).mean()
    torch.testing.assert_close(losses.classification_distill_loss(pred, targets), ce)
    torch.testing.assert_close(losses.classification_distill_loss(pred, targets, pred_m, alpha=0), ce)
    soft = torch.exp(pred_m) / torch.exp(pred_m).sum(1, keepdim=True)
    distill = _token_distill(pred, soft).mean()  # -mean_b sum_c log_softmax(pred) * softmax(pred_m)
    torch.testing.assert_close(losses.classification_distill_loss(pred, targets, pred_m, alpha=0.4),
                               0.6 * ce + 0.4 * distill)


def test_hard_negative_weights_and_sampling():
    sim = torch.tensor([[0., math.log(3.), 0.], [1., 1., 1.], [0., 0., 5.]])
    exclude = torch.eye(3, dtype=torch.bool)
    w = losses.hard_negative_weights(sim, exclude)
    torch.testing.assert_close(w[0], torch.tensor([0., 0.6, 0.2]))  # softmax, diagonal zeroed, not renormalised
    torch.testing.assert_close(w[1], torch.tensor([1 / 3, 0., 1 / 3]))
    torch.testing.assert_close(w[2], torch.tensor([1., 1., 0.]) / (2 + math.exp(5)))
    torch.manual_seed(0)
    draws = torch.stack([losses.sample_negatives(w) for _ in range(2000)])  # (2000, 3)
    assert not (draws == torch.arange(3)).any()  # a zero weight is never drawn
    # drawn in proportion to the weights: row 0 takes 1 with 0.6 / 0.8, rows 1 and 2 their first
    # candidate with 1/2; within 5 binomial standard deviations of 2000 * p
    for row, index, p in ((0, 1, 0.75), (1, 0, 0.5), (2, 0, 0.5)):
        count = (draws[:, row] == index).sum().item()
        assert abs(count - 2000 * p) <= 5 * math.sqrt(2000 * p * (1 - p)), (row, count)
    # on the CPU the same draws as torch.multinomial for the same seed (its docstring)
    torch.manual_seed(5)
    ours = losses.sample_negatives(w)
    torch.manual_seed(5)
    assert torch.equal(ours, torch.multinomial(w, 1).squeeze(1))


# ---------------------------------------------------------------------------------------------------
# VQA rank_answer (docs/DESIGN.md, "VQA model and answer ranking")
# ---------------------------------------------------------------------------------------------------
def test_tile_is_interleaved():
    assert tile(torch.tensor([[1], [2]]), 0, 3).flatten().tolist() == [1, 1, 1, 2, 2, 2]
    assert tile(torch.tensor([[1, 2]]), 1, 2).tolist() == [[1, 1, 2, 2]]


def test_rank_answer_against_direct_computation(make_model, tokenizer):
    model = make_model('vqa').eval()
    answers = ['red apple[SEP]', 'two cats[SEP]', 'yes[SEP]', 'no[SEP]', 'blue[SEP]']
    answer = tokenizer(answers, padding='longest', return_tensors='pt')
    ids = answer.input_ids
    assert ids.shape == (5, 4) and (ids[:2] != 0).all()  # two 2-token answers and three 1-token ones
    # LM-head biases dominate the logits: a clear first-token shortlist that the whole-answer score reorders;
    # a larger transform LayerNorm gain makes the scores depend visibly on the question (so tiling matters)
    bias = {ids[0, 1]: 10.0, ids[1, 1]: 4.5, ids[2, 1]: 2.0, ids[3, 1]: 1.5, ids[4, 1]: 0.0}
    with torch.no_grad():
        for token, value in bias.items():
            model.text_decoder.cls.predictions.bias[token] = value
        model.text_decoder.cls.predictions.transform.LayerNorm.weight.fill_(5.0)
    torch.manual_seed(0)
    question_states = torch.randn(2, 6, 32)
    question_atts = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    k = 3
    with torch.no_grad():
        topk_ids, topk_probs = model.rank_answer(question_states, question_atts, ids, answer.attention_mask, k)
    assert topk_ids.shape == topk_probs.shape == (2, k)
    assert (topk_probs[0].log() - topk_probs[1].log()).abs().max() > 1e-3  # the two questions score differently

    decoder = model.text_decoder
    lengths = answer.attention_mask.sum(1)
    for q in range(2):
        states, atts = question_states[q:q + 1], question_atts[q:q + 1]
        with torch.no_grad():
            first = decoder(ids[:1, :1], encoder_hidden_states=states, encoder_attention_mask=atts).logits[0, 0]
            p_first = torch.softmax(first, 0)[ids[:, 1]]
            shortlist = p_first.topk(k).indices.tolist()
            twice, once = [], []
            for a in shortlist:
                seq = ids[a:a + 1, :lengths[a]]  # the answer alone, without padding
                logits = decoder(seq, encoder_hidden_states=states, encoder_attention_mask=atts).logits[0]
                logp = torch.log_softmax(logits[:-1], -1).gather(1, seq[0, 1:, None]).sum()
                twice.append(torch.log(p_first[a]) + logp)  # the first token counted twice (docs/DESIGN.md, "Quirks we keep")
                once.append(logp)
        log_probs = torch.log_softmax(torch.stack(twice), 0)
        order = log_probs.argsort(descending=True).tolist()
        assert topk_ids[q].tolist() == [shortlist[i] for i in order]
        torch.testing.assert_close(topk_probs[q], log_probs[order].exp(), atol=1e-5, rtol=0)
        # in log space too, so that the small probabilities count as much as the large one
        torch.testing.assert_close(topk_probs[q].log(), log_probs[order], atol=1e-4, rtol=0)
        # the scenario discriminates: re-ranking changes the shortlist order, and so would counting once
        assert [shortlist[i] for i in order] == [0, 2, 1] and shortlist == [0, 1, 2]
        assert torch.stack(once).argmax().item() != order[0]


# ---------------------------------------------------------------------------------------------------
# momentum encoders and queues (docs/DESIGN.md, "Momentum encoders and feature queues")
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('variant', ['retrieval', 'pretrain', 'vqa', 've', 'nlvr'])
def test_copy_params_and_momentum_update(make_model, variant):
    model = make_model(variant, momentum=0.9)
    m = model.momentum
    assert m == (0.9 if variant in ('retrieval', 'pretrain') else 0.995)  # hard-coded in VQA/VE/NLVR
    for online, momentum in model.model_pairs:
        names = [n for n, _ in online.named_parameters()]
        assert names == [n for n, _ in momentum.named_parameters()]  # zip pairs the same tensors
        for p, p_m in zip(online.parameters(), momentum.parameters()):
            assert not p_m.requires_grad and torch.equal(p, p_m)

    torch.manual_seed(1)
    with torch.no_grad():
        for online, _ in model.model_pairs:
            for p in online.parameters():
                p.add_(torch.randn_like(p))
    old = [[p_m.detach().clone() for p_m in momentum.parameters()] for _, momentum in model.model_pairs]
    model._momentum_update()
    for (online, momentum), old_m in zip(model.model_pairs, old):
        for p, p_m, o in zip(online.parameters(), momentum.parameters(), old_m):
            # one lerp per parameter (theta_m + (1 - m)(theta - theta_m)): the original's formula within
            # float32 rounding, not bit for bit
            torch.testing.assert_close(p_m, o * m + p.detach() * (1 - m), rtol=1e-6, atol=1e-7)

    model.copy_params()
    for online, momentum in model.model_pairs:
        for p, p_m in zip(online.parameters(), momentum.parameters()):
            assert torch.equal(p, p_m) and not p_m.requires_grad


@pytest.mark.parametrize('variant', ['retrieval', 'pretrain'])
def test_queue_wraps_around(make_model, variant):
    model = make_model(variant, queue_size=8)
    buffers = dict(model.named_buffers())
    assert {'image_queue', 'text_queue', 'queue_ptr'} <= set(buffers)
    torch.testing.assert_close(model.image_queue.norm(dim=0), torch.ones(8))  # unit columns
    assert model.queue_ptr.dtype == torch.long and model.queue_ptr.tolist() == [0]
    with_idx = variant == 'retrieval'
    if with_idx:
        assert 'idx_queue' in buffers and model.idx_queue.tolist() == [[-100] * 8]

    feats = [(torch.randn(4, 16), torch.randn(4, 16), torch.arange(4) + 10 * i) for i in range(3)]
    expected_ptr = [4, 0, 4]
    written = [slice(0, 4), slice(4, 8), slice(0, 4)]
    for (image_feat, text_feat, idx), ptr, cols in zip(feats, expected_ptr, written):
        model._dequeue_and_enqueue(image_feat, text_feat, idx.view(-1, 1) if with_idx else None)  # idx as a column, as in forward
        assert model.queue_ptr.tolist() == [ptr]
        assert torch.equal(model.image_queue[:, cols], image_feat.T)
        assert torch.equal(model.text_queue[:, cols], text_feat.T)
        if with_idx:
            assert model.idx_queue[0, cols].tolist() == idx.tolist()
    assert torch.equal(model.image_queue[:, 4:8], feats[1][0].T)  # the second batch survives the wrap
    if with_idx:
        assert model.idx_queue[0].tolist() == [20, 21, 22, 23, 10, 11, 12, 13]


def test_queue_rejects_a_batch_that_does_not_divide_it(make_model):
    model = make_model('retrieval', queue_size=8)
    with pytest.raises(ValueError) as info:
        model._dequeue_and_enqueue(torch.randn(3, 16), torch.randn(3, 16), torch.arange(3).view(-1, 1))
    message = str(info.value)
    assert re.search(r'\b8\b', message) and re.search(r'\b3\b', message), message
    assert model.queue_ptr.tolist() == [0]


# ---------------------------------------------------------------------------------------------------
# NLVR2 shared cross-attention (docs/DESIGN.md, "NLVR2 model and image pairs")
# ---------------------------------------------------------------------------------------------------
def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_share_cross_attention_tiny():
    config = tiny_bert_config(num_hidden_layers=6)  # fusion_layer 2: pairs (2, 3) and (4, 5)
    bert = BertModel(config, add_pooling_layer=False)
    before = _count(bert)
    layers = bert.encoder.layer
    kept = {l: {n: (getattr(layers[l + 1].crossattention.self, n).weight,
                    getattr(layers[l + 1].crossattention.self, n).bias) for n in ('key', 'value')} for l in (2, 4)}
    share_cross_attention(bert.encoder)
    for l in (2, 4):
        this, other = layers[l].crossattention.self, layers[l + 1].crossattention.self
        for name in ('key', 'value'):
            assert getattr(this, name) is not getattr(other, name)
            assert getattr(this, name).weight is getattr(other, name).weight is kept[l][name][0]
            assert getattr(this, name).bias is getattr(other, name).bias is kept[l][name][1]
        assert this.query.weight is not other.query.weight
    assert layers[3].crossattention.self.key.weight is not layers[4].crossattention.self.key.weight
    pairs, n_in, n_out = 2, config.encoder_width, config.hidden_size
    assert before - _count(bert) == pairs * 2 * (n_in * n_out + n_out)
    keys = bert.state_dict().keys()
    assert 'encoder.layer.2.crossattention.self.key.weight' in keys
    assert 'encoder.layer.3.crossattention.self.key.weight' in keys


def test_share_cross_attention_full_size_count():
    config = BertConfig.from_json_file(os.path.join(ROOT, 'configs', 'config_bert.json'))
    config.num_hidden_layers = 18
    with torch.device('meta'):
        bert = BertModel(config, add_pooling_layer=False)
    before = _count(bert)
    share_cross_attention(bert.encoder)
    assert before - _count(bert) == 6 * 2 * (768 * 768 + 768)


# ---------------------------------------------------------------------------------------------------
# pre-training mask() (docs/DESIGN.md, "MLM with momentum distillation")
# ---------------------------------------------------------------------------------------------------
# The rule: each token is chosen with probability p (mlm_probability); [PAD] (0) and [CLS] (101) never
# are, [SEP] (102) can be; a chosen token becomes [MASK] (103) with probability 0.8, else a uniformly
# random token of the vocabulary with probability 0.5, else stays; labels are the original ids where
# chosen and -100 elsewhere. The draws come from the global CPU generator in the order bernoulli(p),
# bernoulli(0.8), bernoulli(0.5), randint(vocab) over the whole shape.
MASK, VOCAB = 103, 30522
# [CLS] a red circle next to a blue square [SEP] / [CLS] two small [SEP] and six [PAD]
MASK_INPUT = torch.tensor([[101, 1037, 2417, 4418, 2279, 2000, 1037, 2630, 2675, 102],
                           [101, 2048, 2235, 102, 0, 0, 0, 0, 0, 0]])


def _ids(rows=8, cols=20):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 2000, (rows, cols), generator=g)
    ids[:, 0] = 101
    for r in range(rows):
        ids[r, cols - r:] = 0  # row r has r pads
    ids[0, 5] = 102
    return ids


@pytest.fixture(scope='module')
def pretrain_model(tokenizer):
    from conftest import TINY_CONFIG, build_model
    torch.manual_seed(0)
    return build_model('pretrain', tokenizer, dict(TINY_CONFIG))


def _mask(model, ids, **kwargs):
    return model.mask(ids.clone(), VOCAB, torch.device('cpu'), targets=ids.clone(), **kwargs)


def test_mask_known_answer(pretrain_model):
    # Seed 4, p = 0.5. Derived once by hand from the four draws of seed 4, printed on their own
    # (torch.manual_seed(4); bernoulli(0.5), bernoulli(0.8), bernoulli(0.5) of a 2x10 tensor, then
    # randint(30522, (2, 10))), and the rule above, position by position:
    #   bernoulli(0.5) chooses row 0: 2 3 4 5, row 1: 0 1 3 7 8 9; row 1's 0 is [CLS] and 7-9 are [PAD],
    #     so the chosen are row 0: 2 3 4 5 and row 1: 1 3 ([SEP], which is not protected);
    #   bernoulli(0.8) is 1 at row 0: 2 3 5 -> [MASK]; 0 at row 0: 4 and row 1: 1 3;
    #   bernoulli(0.5) is 1 at row 0: 4 and row 1: 3 -> randint's 17251 and 14582; 0 at row 1: 1 -> kept.
    # So all three outcomes occur, and a different draw order or protection would change these literals.
    torch.manual_seed(4)
    ids, labels = _mask(pretrain_model, MASK_INPUT, probability_matrix=torch.full(MASK_INPUT.shape, 0.5))
    assert ids.tolist() == [[101, 1037, MASK, MASK, 17251, MASK, 1037, 2630, 2675, 102],
                            [101, 2048, 2235, 14582, 0, 0, 0, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, 2417, 4418, 2279, 2000, -100, -100, -100, -100],
                               [-100, 2048, -100, 102, -100, -100, -100, -100, -100, -100]]
    # given indices replace exactly the first draw: draw it ourselves, and the rest is the same
    torch.manual_seed(4)
    chosen = torch.bernoulli(torch.full(MASK_INPUT.shape, 0.5)).bool()
    assert chosen[1, 0] and chosen[1, 7:].all()  # [CLS] and [PAD] drawn, then protected
    given_ids, given_labels = _mask(pretrain_model, MASK_INPUT, masked_indices=chosen)
    assert torch.equal(given_ids, ids) and torch.equal(given_labels, labels)


def test_mask_probability_one_and_zero(pretrain_model):
    special = (MASK_INPUT == 0) | (MASK_INPUT == 101)
    torch.manual_seed(0)
    ids, labels = _mask(pretrain_model, MASK_INPUT, probability_matrix=torch.ones(MASK_INPUT.shape))
    # p = 1: every token but [CLS] and [PAD] is chosen, whatever the seed
    assert labels.tolist() == [[-100, 1037, 2417, 4418, 2279, 2000, 1037, 2630, 2675, 102],
                               [-100, 2048, 2235, 102, -100, -100, -100, -100, -100, -100]]
    assert torch.equal(ids[special], MASK_INPUT[special])
    assert (ids[~special] == MASK).sum() >= 6  # 12 chosen, each [MASK] with probability 0.8
    torch.manual_seed(0)
    all_given = _mask(pretrain_model, MASK_INPUT, masked_indices=torch.ones(MASK_INPUT.shape, dtype=torch.bool))
    assert all_given[1].tolist() == labels.tolist()  # given indices are protected the same way
    # p = 0: nothing is chosen, nothing changes
    ids, labels = _mask(pretrain_model, MASK_INPUT, probability_matrix=torch.zeros(MASK_INPUT.shape))
    assert torch.equal(ids, MASK_INPUT) and (labels == -100).all()


@pytest.mark.parametrize('p', [0.15, 0.5])
def test_mask_invariants_over_seeds(pretrain_model, p):
    ids = _ids()
    special = (ids == 0) | (ids == 101)
    for seed in range(100):
        torch.manual_seed(seed)
        out, labels = _mask(pretrain_model, ids, probability_matrix=torch.full(ids.shape, p))
        chosen = labels != -100
        assert not chosen[special].any(), seed
        assert torch.equal(out[special], ids[special]), seed
        assert torch.equal(labels[chosen], ids[chosen]), seed  # the original ids, exactly where chosen
        assert torch.equal(out[~chosen], ids[~chosen]), seed  # what is not chosen never changes
        assert ((out >= 0) & (out < VOCAB)).all(), seed


def test_mask_proportions(pretrain_model):
    # 2000 rows of [CLS], 63 tokens (ids 1000-1999, [SEP] among them) and some [PAD]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (2000, 64), generator=g)
    ids[:, 0] = 101
    ids[:, 10] = 102
    ids[torch.arange(2000) % 4 == 0, 40:] = 0  # a quarter of the rows padded after 40 tokens
    eligible = ((ids != 0) & (ids != 101)).sum().item()  # 2000 * 63 - 500 * 24 = 114000
    assert eligible == 114000
    torch.manual_seed(0)
    out, labels = _mask(pretrain_model, ids, probability_matrix=torch.full(ids.shape, 0.15))
    chosen = labels != -100
    n = chosen.sum().item()

    def within(count, trials, prob):
        """count is within 5 binomial standard deviations, sqrt(trials p (1 - p)), of trials * p: a
        correct rule fails that with probability below 1e-6 (and the seed is fixed); wrong rates
        (0.16 chosen instead of 0.15, 0.12 random instead of 0.1, [SEP] protected) are 8 or more
        deviations off."""
        return abs(count - trials * prob) <= 5 * math.sqrt(trials * prob * (1 - prob))
    assert within(n, eligible, 0.15), n
    assert within(chosen[:, 10].sum().item(), 2000, 0.15)  # [SEP] is chosen like any other token
    masked = (out == MASK) & chosen
    random_word = (out != ids) & (out != MASK)
    kept = (out == ids) & chosen
    # a random draw equal to [MASK] or to the original id (about 2 in 30522) moves about 1 count here
    assert within(masked.sum().item(), n, 0.8) and within(random_word.sum().item(), n, 0.1)
    assert within(kept.sum().item(), n, 0.1), (masked.sum(), random_word.sum(), kept.sum())
    # the random tokens are uniform over the vocabulary: mean (V - 1) / 2, standard error V / sqrt(12 m)
    m = random_word.sum().item()
    assert abs(out[random_word].double().mean().item() - (VOCAB - 1) / 2) <= 5 * VOCAB / math.sqrt(12 * m)


def test_mask_without_targets_returns_the_same_ids(pretrain_model):
    ids = _ids()
    probability = torch.full(ids.shape, 0.15)
    torch.manual_seed(3)
    out = pretrain_model.mask(ids.clone(), VOCAB, torch.device('cpu'), probability_matrix=probability)
    torch.manual_seed(3)
    with_targets, labels = _mask(pretrain_model, ids, probability_matrix=probability)
    assert torch.equal(out, with_targets)  # the targets change no draw
    assert (labels != -100).any() and not torch.equal(out, ids)


# ---------------------------------------------------------------------------------------------------
# BERT weight loading and parity with transformers (docs/DESIGN.md, "BERT weights and initialisation")
# ---------------------------------------------------------------------------------------------------
CROSS_SUFFIXES = [f'crossattention.{m}.{p}' for m in ('self.query', 'self.key', 'self.value', 'output.dense',
                                                        'output.LayerNorm') for p in ('weight', 'bias')]
MLM_HEAD = ['cls.predictions.bias', 'cls.predictions.transform.dense.weight', 'cls.predictions.transform.dense.bias',
            'cls.predictions.transform.LayerNorm.weight', 'cls.predictions.transform.LayerNorm.bias']


def minilm_config(minilm_dir, **overrides):
    config = BertConfig.from_json_file(os.path.join(minilm_dir, 'config.json'))
    config.fusion_layer, config.encoder_width = 4, 384
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope='module')
def minilm_weights(minilm_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(minilm_dir, 'model.safetensors'))


@pytest.fixture(scope='module')
def minilm_bert(minilm_dir):
    return BertModel.from_pretrained(minilm_dir, config=minilm_config(minilm_dir), add_pooling_layer=False)


def test_from_pretrained_bert_model(minilm_bert, minilm_weights):
    assert not any(k.startswith('cls.') or k.startswith('bert.') for k in minilm_weights)
    state = minilm_bert.state_dict()
    loaded = [k for k in minilm_weights if not k.startswith('pooler.')]
    assert len(loaded) == 102  # embeddings (incl. position_ids) and 6 layers; the pooler is dropped
    for key in loaded:
        assert torch.equal(state[key], minilm_weights[key]), key
    expected_missing = {f'encoder.layer.{l}.{s}' for l in (4, 5) for s in CROSS_SUFFIXES}
    assert set(minilm_bert.loading_info['missing_keys']) == expected_missing
    assert len(minilm_bert.loading_info['missing_keys']) == 20
    # what was new is freshly initialised: normal(0, 0.02) weights, zero biases, LayerNorm 1/0
    cross = minilm_bert.encoder.layer[4].crossattention
    assert 0.015 < cross.self.query.weight.std().item() < 0.025
    assert torch.equal(cross.self.key.bias, torch.zeros(384))
    assert torch.equal(cross.output.LayerNorm.weight, torch.ones(384))


def test_from_pretrained_masked_lm(minilm_dir, minilm_weights):
    model = BertForMaskedLM.from_pretrained(minilm_dir, config=minilm_config(minilm_dir))
    state = model.state_dict()
    for key in minilm_weights:
        if not key.startswith('pooler.'):
            assert torch.equal(state[f'bert.{key}'], minilm_weights[key]), key
    expected_missing = {f'bert.encoder.layer.{l}.{s}' for l in (4, 5) for s in CROSS_SUFFIXES} | set(MLM_HEAD)
    assert set(model.loading_info['missing_keys']) == expected_missing
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias


def test_from_pretrained_reports_new_layers(minilm_dir, minilm_weights):
    config = minilm_config(minilm_dir, fusion_layer=6, num_hidden_layers=8)
    model = BertModel.from_pretrained(minilm_dir, config=config, add_pooling_layer=False)
    expected = {k for k in model.state_dict() if k.startswith(('encoder.layer.6.', 'encoder.layer.7.'))}
    assert any('crossattention' in k for k in expected) and any('intermediate' in k for k in expected)
    assert set(model.loading_info['missing_keys']) == expected
    assert torch.equal(model.encoder.layer[5].output.dense.weight, minilm_weights['encoder.layer.5.output.dense.weight'])


def _write_old_style_checkpoint(path, seed=0):
    """An HF-style BERT-for-pretraining directory with 'bert.' prefixes, LayerNorm gamma/beta names,
    a pooler, an MLM head and a next-sentence head. Returns {our BertModel key: tensor}."""
    torch.manual_seed(seed)
    source_config = tiny_bert_config(fusion_layer=4)  # a plain 4-layer BERT: no cross-attention
    source = BertModel(source_config, add_pooling_layer=True)
    ours = {k: v.clone() for k, v in source.state_dict().items()}

    def old_name(key):
        return key.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias', 'LayerNorm.beta')
    checkpoint = {'bert.' + old_name(k): v for k, v in ours.items()}
    head = {'cls.predictions.bias': torch.randn(30522), 'cls.predictions.transform.dense.weight': torch.randn(32, 32),
            'cls.predictions.transform.dense.bias': torch.randn(32),
            'cls.predictions.transform.LayerNorm.weight': torch.randn(32),
            'cls.predictions.transform.LayerNorm.bias': torch.randn(32)}
    checkpoint.update({old_name(k): v for k, v in head.items()})
    checkpoint['cls.predictions.decoder.weight'] = ours['embeddings.word_embeddings.weight']
    checkpoint['cls.seq_relationship.weight'] = torch.randn(2, 32)
    checkpoint['cls.seq_relationship.bias'] = torch.randn(2)
    assert 'bert.embeddings.LayerNorm.gamma' in checkpoint and 'bert.pooler.dense.weight' in checkpoint
    torch.save(checkpoint, os.path.join(path, 'pytorch_model.bin'))
    with open(TINY_BERT_CONFIG) as f:
        config = json.load(f)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(config, f)  # fusion_layer 2, encoder_width 48
    return ours, head


def test_from_pretrained_old_checkpoint_names(tmp_path):
    ours, head = _write_old_style_checkpoint(str(tmp_path))
    config = tiny_bert_config()  # fusion_layer 2: layers 2-3 get new cross-attention

    bert = BertModel.from_pretrained(str(tmp_path), config=config, add_pooling_layer=False)
    state = bert.state_dict()
    for key, value in ours.items():
        if not key.startswith('pooler.'):
            assert torch.equal(state[key], value), key
    assert set(bert.loading_info['missing_keys']) == {f'encoder.layer.{l}.{s}' for l in (2, 3) for s in CROSS_SUFFIXES}

    pooled = BertModel.from_pretrained(str(tmp_path), config=tiny_bert_config(), add_pooling_layer=True)
    assert torch.equal(pooled.pooler.dense.weight, ours['pooler.dense.weight'])

    mlm = BertForMaskedLM.from_pretrained(str(tmp_path), config=tiny_bert_config())
    state = mlm.state_dict()
    for key, value in head.items():
        assert torch.equal(state[key], value), key
    assert torch.equal(state['bert.embeddings.LayerNorm.weight'], ours['embeddings.LayerNorm.weight'])
    assert set(mlm.loading_info['missing_keys']) == {f'bert.encoder.layer.{l}.{s}' for l in (2, 3)
                                                    for s in CROSS_SUFFIXES}
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight

    from_dir_config = BertModel.from_pretrained(str(tmp_path), add_pooling_layer=False)  # config.json of the dir
    assert from_dir_config.config.fusion_layer == 2


def test_text_encoder_matches_transformers_bert(minilm_dir, tokenizer):
    import transformers
    reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
    config = minilm_config(minilm_dir, fusion_layer=6)  # = num_hidden_layers: no cross-attention
    ours = BertModel.from_pretrained(minilm_dir, config=config, add_pooling_layer=False).eval()
    text = tokenizer(['a man riding a horse on the beach at sunset', 'two dogs', 'hello'],
                     padding='longest', return_tensors='pt')
    with torch.no_grad():
        expected = reference(input_ids=text.input_ids, attention_mask=text.attention_mask).last_hidden_state
        text_mode = ours(text.input_ids, attention_mask=text.attention_mask, mode='text').last_hidden_state
        multi_modal = ours(text.input_ids, attention_mask=text.attention_mask).last_hidden_state
    assert (text.attention_mask == 0).any()  # padded keys are masked the same way
    torch.testing.assert_close(text_mode, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(multi_modal, text_mode, atol=0, rtol=0)
