"""Known-answer unit tests of the model parts that training moves: the momentum encoders and
queues, NLVR2's shared cross-attention, pre-training's MLM masking, and BERT weight loading
(docs/DESIGN.md, the sections named above each group below). tests/test_units.py has the building
blocks (position embeddings, attention masks, losses, answer ranking).

Expected values are computed by hand or by an independent re-implementation written here, never
by calling the code under test a second time.
"""
import json
import math
import os
import re

import pytest
import torch

from conftest import ROOT, TINY_BERT_CONFIG, tiny_bert_config
from models.model_nlvr import share_cross_attention
from models.xbert import BertConfig, BertForMaskedLM, BertModel



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
