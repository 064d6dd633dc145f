"""Retrieval evaluation: itm_eval on hand-made scores, batched re-ranking against the one-query-
at-a-time computation, the re-ranking score (the ITM match logit) on hand-set heads, the rank
split, and the embedding API."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.retrieval_eval import chance_metrics, itm_eval, itm_scores, rank_rows, rerank, retrieval_scores

IMG2TXT = {0: [0, 1], 1: [2, 3], 2: [4, 5]}
TXT2IMG = {t: i for i, texts in IMG2TXT.items() for t in texts}


def test_itm_eval_known_answers():
    scores_i2t = np.array([
        [0.1, 0.9, 0.8, 0.0, 0.0, 0.0],   # image 0: its text 1 is first -> rank 0
        [0.9, 0.1, 0.2, 0.8, 0.0, 0.0],   # image 1: text 0, then its text 3 -> rank 1
        [0.7, 0.6, 0.5, 0.4, 0.3, 0.2],   # image 2: its texts are last -> rank 4 (best of 4 and 5)
    ])
    scores_t2i = np.array([
        [0.9, 0.1, 0.0],   # text 0 -> image 0 first: rank 0
        [0.1, 0.9, 0.0],   # text 1 -> image 0 second: rank 1
        [0.0, 0.9, 0.1],   # rank 0
        [0.0, 0.1, 0.9],   # rank 1
        [0.0, 0.1, 0.9],   # rank 0
        [0.9, 0.1, 0.0],   # rank 2
    ])
    result = itm_eval(scores_i2t, scores_t2i, TXT2IMG, IMG2TXT)
    assert result['txt_r1'] == pytest.approx(100 / 3)
    assert result['txt_r5'] == result['txt_r10'] == 100.0
    assert result['img_r1'] == pytest.approx(50.0)
    assert result['img_r5'] == result['img_r10'] == 100.0
    assert result['txt_r_mean'] == pytest.approx((100 / 3 + 200) / 3)
    assert result['img_r_mean'] == pytest.approx(250 / 3)
    assert result['r_mean'] == pytest.approx((result['txt_r_mean'] + result['img_r_mean']) / 2)
    assert set(result) == {'txt_r1', 'txt_r5', 'txt_r10', 'txt_r_mean', 'img_r1', 'img_r5', 'img_r10',
                           'img_r_mean', 'r_mean'}
    assert all(type(v) is float for v in result.values())


def test_itm_eval_ties_follow_the_reversed_argsort():
    # all scores equal: numpy's argsort keeps index order, reversed puts the LAST index first
    flat_i2t = np.zeros((3, 6))
    flat_t2i = np.zeros((6, 3))
    many = {i: list(range(i * 4, i * 4 + 4)) for i in range(3)}  # 12 texts, to pass the 10-rank cut
    result = itm_eval(np.zeros((3, 12)), np.zeros((12, 3)), {t: i for i, ts in many.items() for t in ts}, many)
    # image i's best text is 4i+3, at position 11 - (4i+3): ranks 8, 4, 0
    assert result['txt_r1'] == pytest.approx(100 / 3) and result['txt_r5'] == pytest.approx(200 / 3)
    # text t's image i at position 2 - i: ranks 2, 1, 0 for images 0, 1, 2 (4 texts each)
    assert (result['img_r1'], result['img_r5']) == (pytest.approx(100 / 3), 100.0)
    assert itm_eval(flat_i2t, flat_t2i, TXT2IMG, IMG2TXT)['img_r1'] == pytest.approx(100 / 3)


def test_chance_levels():
    chance = chance_metrics(num_images=100, num_texts=500, texts_per_image=5)
    # one of 5 positives among 500 in the top 1: 1%; single positive among 100 in the top 10: 10%
    assert chance['img_r_mean'] == pytest.approx((1 + 5 + 10) / 3)
    assert 1.0 < chance['txt_r_mean'] < 6.0


def test_rank_rows_cover_every_row_once():
    for num_rows, world in ((10, 1), (10, 3), (7, 2), (5, 8)):
        rows = torch.cat([rank_rows(num_rows, r, world) for r in range(world)])
        assert rows.tolist() == list(range(num_rows))


@pytest.fixture(scope='module')
def tiny_retrieval(tokenizer):
    from conftest import TINY_CONFIG, build_model
    torch.manual_seed(0)
    model = build_model('retrieval', tokenizer, dict(TINY_CONFIG)).eval()
    images = torch.randn(7, 3, 32, 32)
    texts = [f'a {c} {s} on the {p}' for c in ('red', 'blue') for s in ('circle', 'square') for p in ('left', 'top')]
    texts += ['one more text about nothing', 'green']
    text = tokenizer(texts, padding='max_length', truncation=True, max_length=12, return_tensors='pt')
    with torch.no_grad():
        text_feats = model.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text') \
            .last_hidden_state
        image_feats = model.visual_encoder(images)
    sims = torch.randn(7, len(texts))
    return model, image_feats, text_feats, text.attention_mask, sims


@pytest.mark.parametrize('direction', ['i2t', 't2i'])
def test_batched_rerank_equals_one_query_at_a_time(tiny_retrieval, direction):
    model, image_feats, text_feats, text_atts, sims = tiny_retrieval
    matrix = sims if direction == 'i2t' else sims.t()
    k = 4
    per_query = rerank(model, matrix, image_feats, text_feats, text_atts, k, direction, pairs_per_pass=k,
                       share_images=False)
    for pairs_per_pass in (5, 10 ** 6):
        batched = rerank(model, matrix, image_feats, text_feats, text_atts, k, direction,
                         pairs_per_pass=pairs_per_pass)
        torch.testing.assert_close(batched, per_query, rtol=1e-5, atol=1e-5)
    # the direct computation: each query's top-k candidates scored by ITM, -100 elsewhere
    for q in range(matrix.size(0)):
        top = matrix[q].topk(k).indices
        if direction == 'i2t':
            expected = itm_scores(model, image_feats[q].repeat(k, 1, 1), text_feats[top], text_atts[top])
        else:
            expected = itm_scores(model, image_feats[top], text_feats[q].repeat(k, 1, 1), text_atts[q].repeat(k, 1))
        torch.testing.assert_close(per_query[q, top], expected, rtol=1e-5, atol=1e-5)
        rest = torch.ones(matrix.size(1), dtype=torch.bool)
        rest[top] = False
        assert (per_query[q, rest] == -100).all()
    # ranks: the partial matrices of a 3-way split sum to the whole
    parts = sum(rerank(model, matrix, image_feats, text_feats, text_atts, k, direction, rank_rows(matrix.size(0), r, 3))
                for r in range(3))
    torch.testing.assert_close(parts, batched, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def direct_match_logit(model, image_feat, text_feat, text_att):
    """The ITM head's match logit (column 1) of one pair, by one plain fusion pass."""
    output = model.text_encoder(encoder_embeds=text_feat[None], attention_mask=text_att[None],
                                encoder_hidden_states=image_feat[None], mode='fusion')
    return float(model.itm_head(output.last_hidden_state[:, 0])[0, 1])


def test_rerank_score_is_the_match_logit(tiny_retrieval):
    """retrieval_scores re-ranks each query's top-k ITC candidates by the ITM head's match logit
    (column 1 of (no match, match)), -100 elsewhere."""
    model, image_feats, text_feats, text_atts, _ = tiny_retrieval
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # far from BERT's init, where every pair's fused [CLS] is about the same
        for weight in model.text_encoder.parameters():
            if weight.dim() >= 2:
                weight.normal_(0, 0.2, generator=generator)
    image_embeds = F.normalize(torch.randn(len(image_feats), 16, generator=generator), dim=-1)
    text_embeds = F.normalize(torch.randn(len(text_feats), 16, generator=generator), dim=-1)
    sims = (image_embeds @ text_embeds.t()).numpy()
    k = 3

    def scores():
        return retrieval_scores(model, image_feats, image_embeds, text_feats, text_embeds, text_atts, k,
                                show_progress=False)

    def top_k(matrix):
        return np.argsort(-matrix, axis=1, kind='stable')[:, :k]

    # a head that gives every pair the logits (no match 3, match -2): the candidates score -2
    with torch.no_grad():
        model.itm_head.weight.zero_()
        model.itm_head.bias.copy_(torch.tensor([3.0, -2.0]))
    for got, matrix in zip(scores(), (sims, sims.T)):
        expected = np.full(matrix.shape, -100.0, dtype=np.float32)
        np.put_along_axis(expected, top_k(matrix), -2.0, axis=1)
        np.testing.assert_array_equal(got, expected)
    # a head whose no-match logit is minus the match logit: the two orders of the candidates are reversed
    with torch.no_grad():
        v = torch.randn(model.itm_head.weight.shape[1], generator=generator)
        model.itm_head.weight.copy_(torch.stack([-v, v]))
        model.itm_head.bias.zero_()
    i2t, t2i = scores()
    for q, candidates in enumerate(top_k(sims)):
        expected = [direct_match_logit(model, image_feats[q], text_feats[c], text_atts[c]) for c in candidates]
        np.testing.assert_allclose(i2t[q, candidates], expected, rtol=1e-4, atol=1e-4)
        assert max(expected) - min(expected) > 0.1  # the order is the match logit's, and not the other's
    for q, candidates in enumerate(top_k(sims.T)):
        expected = [direct_match_logit(model, image_feats[c], text_feats[q], text_atts[q]) for c in candidates]
        np.testing.assert_allclose(t2i[q, candidates], expected, rtol=1e-4, atol=1e-4)
