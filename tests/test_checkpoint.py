"""Checkpoint reading and conversion (models/checkpoint.py) on synthetic state_dicts that have the
original key layout (12 BERT layers, fusion at 6, 12 ViT blocks) at tiny widths."""
import json
import os

import pytest
import torch

from models import model_nlvr, model_pretrain, model_pretrain_nlvr, model_retrieval, model_ve, model_vqa
from models.checkpoint import CheckpointError, load_checkpoint, pretrain_to_ta, pretrain_to_vqa, strip_bert, \
    strip_for_release

REFERENCE = os.path.join(os.path.dirname(__file__), 'fixtures', 'state_dict_keys')


def config(image_res=32, **overrides):
    cfg = dict(bert_config='tests/fixtures/config_bert_12x8.json', image_res=image_res, patch_size=16,
               vision_width=8, vision_depth=12, vision_num_heads=2, embed_dim=4, temp=0.07, mlm_probability=0.15,
               queue_size=8, momentum=0.995, distill=True, alpha=0.4)
    cfg.update(overrides)
    return cfg


def build(module, tokenizer, **overrides):
    torch.manual_seed(0)
    kwargs = {'init_deit': False} if module is model_pretrain else {}
    return module.ALBEF(tokenizer=tokenizer, config=config(**overrides), **kwargs)


@pytest.fixture(scope='module')
def pretrain_sd(tokenizer):
    """A synthetic ALBEF.pth 'model' entry: random values, original key layout, 32 px."""
    model = build(model_pretrain, tokenizer)
    torch.manual_seed(1)
    for tensor in list(model.parameters()) + [model.image_queue, model.text_queue]:
        tensor.data.normal_()  # in place, so tied weights stay one tensor as in a real file
    return {k: v.clone() for k, v in model.state_dict().items()}


def prefixes(keys):
    return {k.split('.')[0] + ('.cls' if '.cls.' in k else '') for k in keys}


def test_synthetic_layout_is_the_reference_layout(pretrain_sd):
    path = os.path.join(REFERENCE, 'pretrain.json')
    assert set(pretrain_sd) == set(json.load(open(path)))


def test_strip_bert_keys():
    sd = {'text_encoder.bert.encoder.layer.0.x': 1, 'text_encoder_m.bert.embeddings.y': 2, 'temp': 3}
    assert strip_bert(sd) == {'text_encoder.encoder.layer.0.x': 1, 'text_encoder_m.embeddings.y': 2, 'temp': 3}


def test_vqa_conversion_keys():
    sd = {f'text_encoder.bert.encoder.layer.{n}.crossattention.self.key.weight': n for n in (6, 11)}
    sd['text_encoder.bert.encoder.layer.5.attention.self.key.weight'] = 5
    sd.update({'text_encoder.bert.embeddings.word_embeddings.weight': 'emb', 'text_encoder.cls.predictions.bias': 'b',
               'text_encoder_m.bert.encoder.layer.9.output.dense.weight': 'm9', 'visual_encoder.cls_token': 'v'})
    out = pretrain_to_vqa(sd)
    assert out == {
        'text_encoder.encoder.layer.5.attention.self.key.weight': 5,
        'text_encoder.encoder.layer.6.crossattention.self.key.weight': 6,
        'text_encoder.encoder.layer.11.crossattention.self.key.weight': 11,
        'text_decoder.bert.encoder.layer.0.crossattention.self.key.weight': 6,
        'text_decoder.bert.encoder.layer.5.crossattention.self.key.weight': 11,
        'text_encoder.embeddings.word_embeddings.weight': 'emb',
        'text_decoder.bert.embeddings.word_embeddings.weight': 'emb',
        'text_decoder.cls.predictions.bias': 'b',
        'text_encoder_m.encoder.layer.9.output.dense.weight': 'm9',
        'text_decoder_m.bert.encoder.layer.3.output.dense.weight': 'm9',
        'visual_encoder.cls_token': 'v'}


def test_ta_conversion_keys():
    sd = {f'text_encoder.bert.encoder.layer.{n}.output.dense.weight': n for n in (0, 5, 6, 7, 11)}
    sd['text_encoder.bert.encoder.layer.6.crossattention.self.key.weight'] = 'x6'
    sd['text_encoder.bert.embeddings.LayerNorm.weight'] = 'ln'
    sd['itm_head.weight'] = 'itm'
    out = pretrain_to_ta(sd)
    assert out == {'text_encoder.encoder.layer.0.output.dense.weight': 0,
                   'text_encoder.encoder.layer.5.output.dense.weight': 5,
                   'text_encoder.encoder.layer.6.output.dense.weight': 6,
                   'text_encoder.encoder.layer.7.output.dense.weight': 6,
                   'text_encoder.encoder.layer.8.output.dense.weight': 7,
                   'text_encoder.encoder.layer.9.output.dense.weight': 7,
                   'text_encoder.encoder.layer.16.output.dense.weight': 11,
                   'text_encoder.encoder.layer.17.output.dense.weight': 11,
                   'text_encoder.encoder.layer.6.crossattention.self.key.weight': 'x6',
                   'text_encoder.encoder.layer.7.crossattention.self.key.weight': 'x6',
                   'text_encoder.embeddings.LayerNorm.weight': 'ln', 'itm_head.weight': 'itm'}


def assert_loaded(model, converted):
    """Every converted tensor the model has was loaded, and with the foreign keys dropped the
    converted dict loads with strict=True once the reported-missing keys are filled in."""
    own = model.state_dict()
    for key, value in converted.items():
        if key in own:
            assert torch.equal(own[key], value), key
    fill = {k: v for k, v in own.items() if k not in converted}
    model.load_state_dict({**{k: v for k, v in converted.items() if k in own}, **fill}, strict=True)


def test_pretrain_to_retrieval(tokenizer, pretrain_sd, tmp_path):
    path = tmp_path / 'ALBEF.pth'
    torch.save({'model': pretrain_sd, 'epoch': 29, 'config': {'lr': 1e-4}}, path)
    model = build(model_retrieval, tokenizer, image_res=48)
    report = load_checkpoint(model, str(path))
    assert report.missing_keys == ['idx_queue']
    assert prefixes(report.unexpected_keys) == {'text_encoder.cls', 'text_encoder_m.cls'}
    converted = strip_bert(pretrain_sd)
    # 32 px -> 48 px: both position embeddings resized (2x2 -> 3x3 patches), CLS row kept
    for name in ('visual_encoder', 'visual_encoder_m'):
        pos = model.state_dict()[f'{name}.pos_embed']
        assert pos.shape == (1, 10, 8)
        assert torch.equal(pos[:, 0], pretrain_sd[f'{name}.pos_embed'][:, 0])
        converted[f'{name}.pos_embed'] = pos
    assert_loaded(model, converted)
    # the pre-training queues are inherited, the index queue is not
    assert torch.equal(model.image_queue, pretrain_sd['image_queue'])
    assert (model.idx_queue == -100).all()


def test_pretrain_to_ve(tokenizer, pretrain_sd):
    model = build(model_ve, tokenizer)
    report = load_checkpoint(model, pretrain_sd)
    assert prefixes(report.missing_keys) == {'cls_head', 'cls_head_m'}
    assert prefixes(report.unexpected_keys) == {
        'text_encoder.cls', 'text_encoder_m.cls', 'vision_proj', 'vision_proj_m', 'text_proj', 'text_proj_m',
        'temp', 'itm_head', 'image_queue', 'text_queue', 'queue_ptr'}
    assert_loaded(model, strip_bert(pretrain_sd))
    # the momentum encoders start from the pre-trained momentum weights
    assert torch.equal(model.visual_encoder_m.cls_token, pretrain_sd['visual_encoder_m.cls_token'])


def test_pretrain_to_vqa(tokenizer, pretrain_sd):
    model = build(model_vqa, tokenizer)
    report = load_checkpoint(model, pretrain_sd)
    assert report.missing_keys == []
    assert prefixes(report.unexpected_keys) == {
        'vision_proj', 'vision_proj_m', 'text_proj', 'text_proj_m', 'temp', 'itm_head', 'image_queue',
        'text_queue', 'queue_ptr'}
    assert_loaded(model, pretrain_to_vqa(pretrain_sd))
    fusion = model.text_decoder.bert.encoder.layer[0].crossattention.self.query.weight
    assert torch.equal(fusion, pretrain_sd['text_encoder.bert.encoder.layer.6.crossattention.self.query.weight'])
    assert torch.equal(model.text_decoder_m.cls.predictions.bias, pretrain_sd['text_encoder_m.cls.predictions.bias'])
    # the tied decoder weight still is the word embedding table
    assert model.text_decoder.cls.predictions.decoder.weight is model.text_decoder.bert.embeddings.word_embeddings.weight


def test_pretrain_to_ta_then_nlvr(tokenizer, pretrain_sd, tmp_path):
    ta = build(model_pretrain_nlvr, tokenizer)
    report = load_checkpoint(ta, pretrain_sd)
    assert prefixes(report.missing_keys) == {'ta_head'}
    assert prefixes(report.unexpected_keys) == {
        'visual_encoder_m', 'vision_proj_m', 'text_encoder_m', 'text_proj_m', 'text_encoder.cls',
        'text_encoder_m.cls', 'itm_head', 'image_queue', 'text_queue', 'queue_ptr'}
    assert_loaded(ta, pretrain_to_ta(pretrain_sd))
    layers = ta.text_encoder.encoder.layer
    source = pretrain_sd['text_encoder.bert.encoder.layer.11.intermediate.dense.weight']
    assert torch.equal(layers[16].intermediate.dense.weight, source)
    assert torch.equal(layers[17].intermediate.dense.weight, source)
    assert layers[6].crossattention.self.key.weight is layers[7].crossattention.self.key.weight
    torch.save({'model': ta.state_dict()}, tmp_path / 'ta.pth')

    nlvr = build(model_nlvr, tokenizer)
    momentum_before = nlvr.visual_encoder_m.cls_token.clone()
    report = load_checkpoint(nlvr, str(tmp_path / 'ta.pth'), sync_momentum=False)
    assert prefixes(report.missing_keys) == {'cls_head', 'cls_head_m', 'visual_encoder_m', 'text_encoder_m'}
    assert prefixes(report.unexpected_keys) == {'vision_proj', 'text_proj', 'temp', 'ta_head'}
    # faithful NLVR: the momentum model keeps its pre-load weights
    assert torch.equal(nlvr.visual_encoder_m.cls_token, momentum_before)
    assert not torch.equal(nlvr.visual_encoder_m.cls_token, nlvr.visual_encoder.cls_token)
    assert_loaded(nlvr, ta.state_dict())


def test_released_finetuned_file(tokenizer, tmp_path):
    """mscoco.pth-style: a bare state_dict without momentum encoders and queues."""
    torch.manual_seed(3)
    finetuned = build(model_retrieval, tokenizer)
    for p in finetuned.parameters():
        p.data.normal_()
    released = strip_for_release(finetuned.state_dict())
    assert not any(k.split('.')[0].endswith('_m') for k in released) and 'image_queue' not in released
    torch.save(released, tmp_path / 'mscoco.pth')
    model = build(model_retrieval, tokenizer)
    report = load_checkpoint(model, str(tmp_path / 'mscoco.pth'), allow_new_heads=False)
    assert prefixes(report.missing_keys) == {'visual_encoder_m', 'vision_proj_m', 'text_encoder_m', 'text_proj_m',
                                             'image_queue', 'text_queue', 'idx_queue', 'queue_ptr'}
    assert report.unexpected_keys == [] and report.momentum_from_online
    assert torch.equal(model.text_encoder_m.encoder.layer[7].output.dense.weight,
                       finetuned.text_encoder.encoder.layer[7].output.dense.weight)
    assert_loaded(model, released)


def test_missing_required_key_is_named(tokenizer, pretrain_sd):
    broken = dict(pretrain_sd)
    del broken['text_encoder.bert.encoder.layer.3.output.dense.weight']
    with pytest.raises(CheckpointError, match=r'missing: text_encoder\.encoder\.layer\.3\.output\.dense\.weight'):
        load_checkpoint(build(model_retrieval, tokenizer), broken)


def test_new_head_required_when_evaluating(tokenizer, pretrain_sd):
    with pytest.raises(CheckpointError, match=r'missing: cls_head\.0\.weight'):
        load_checkpoint(build(model_ve, tokenizer), pretrain_sd, allow_new_heads=False)


def test_wrong_shape_is_named(tokenizer, pretrain_sd):
    broken = dict(pretrain_sd, **{'itm_head.weight': torch.zeros(3, 8)})
    with pytest.raises(CheckpointError, match=r'wrong shape: itm_head\.weight: checkpoint \(3, 8\) vs model \(2, 8\)'):
        load_checkpoint(build(model_retrieval, tokenizer), broken)


def test_checkpoint_of_another_model(tokenizer, pretrain_sd):
    ta_sd = pretrain_to_ta(pretrain_sd)  # 18 layers: does not fit the 12-layer retrieval model
    with pytest.raises(CheckpointError, match=r'unexpected: text_encoder\.encoder\.layer\.12\.'):
        load_checkpoint(build(model_retrieval, tokenizer), ta_sd)


def test_unreadable_and_absent_files(tokenizer, tmp_path):
    model = build(model_ve, tokenizer)
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint at all')
    with pytest.raises(CheckpointError, match=r'garbage\.pth is not a PyTorch checkpoint \(neither a torch\.save '
                                              r'archive nor a pickle\)$'):
        load_checkpoint(model, str(garbage))
    with pytest.raises(FileNotFoundError, match='checkpoint not found: .*nowhere.pth'):
        load_checkpoint(model, str(tmp_path / 'nowhere.pth'))
    torch.save({'optimizer': {}}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointError, match='expected a state_dict'):
        load_checkpoint(model, str(tmp_path / 'other.pth'))
