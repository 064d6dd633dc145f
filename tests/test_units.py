"""Known-answer unit tests of the model building blocks (docs/DESIGN.md, the
sections named above each group below, and "How the tests pin this behaviour").

Expected values are computed by hand or by an independent re-implementation written here, never
by calling the code under test a second time.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_bert_config
from models import losses
from models.model_vqa import tile
from models.vit import VisionTransformer, interpolate_pos_embed
from models.xbert import BertLMHeadModel, BertModel



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
