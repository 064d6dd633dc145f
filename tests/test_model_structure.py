"""Full-size models match the original ALBEF state_dict layout (docs/DESIGN.md,
"Checkpoint layouts and conversions", "BERT state_dict layout", "NLVR2 model and image pairs").

Every variant is built at full size on the meta device (no memory, no init) from its real task YAML
and compared with the original's keys (tests/fixtures/state_dict_keys): the same keys, shapes and dtypes, and the
same aliasing (tied MLM decoder, NLVR2's shared cross-attention key/value), realised as one
Parameter object that `.parameters()` yields once.
"""
import json
import os
from collections import defaultdict

import pytest
import torch
from ruamel.yaml import YAML

from conftest import ROOT, VARIANTS, build_model

# a copy of shared/reference/state_dict_keys: keys and shapes of the original models at full size
REFERENCE = os.path.join(ROOT, 'tests', 'fixtures', 'state_dict_keys')
YAML_OF = {'pretrain': 'Pretrain.yaml', 'retrieval': 'Retrieval_coco.yaml', 'vqa': 'VQA.yaml', 've': 'VE.yaml',
           'nlvr': 'NLVR.yaml', 'pretrain_nlvr': 'NLVR_pretrain.yaml'}
IMAGE_RES = {'pretrain': 256, 'pretrain_nlvr': 256, 'retrieval': 384, 'vqa': 384, 've': 384, 'nlvr': 384}


def _reference(name):
    with open(os.path.join(REFERENCE, f'{name}.json')) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def full_models(tokenizer):
    """variant -> full-size model on the meta device (built once per module)."""
    models = {}
    for variant in VARIANTS:
        with open(os.path.join(ROOT, 'configs', YAML_OF[variant])) as f:
            config = dict(YAML(typ='safe').load(f))
        assert config['image_res'] == IMAGE_RES[variant]
        config['bert_config'] = os.path.join(ROOT, 'configs', 'config_bert.json')
        with torch.device('meta'):
            models[variant] = build_model(variant, tokenizer, config)
    return models


def _describe_differences(ours, reference, limit=25):
    lines = []
    missing = [k for k in reference if k not in ours]
    extra = [k for k in ours if k not in reference]
    if missing:
        lines.append(f'{len(missing)} reference keys missing from our model: {missing[:limit]}')
    if extra:
        lines.append(f'{len(extra)} keys of our model not in the reference: {extra[:limit]}')
    wrong = [f'{k}: ours {list(ours[k].shape)} {str(ours[k].dtype).replace("torch.", "")}, reference '
             f'{reference[k]["shape"]} {reference[k]["dtype"]}'
             for k in reference if k in ours
             and (list(ours[k].shape) != reference[k]['shape']
                  or str(ours[k].dtype).replace('torch.', '') != reference[k]['dtype'])]
    if wrong:
        lines.append(f'{len(wrong)} keys with another shape or dtype:\n  ' + '\n  '.join(wrong[:limit]))
    return '\n'.join(lines)


@pytest.mark.parametrize('variant', VARIANTS)
def test_state_dict_matches_reference(full_models, variant):
    model = full_models[variant]
    state = model.state_dict()
    reference = _reference(variant)
    differences = _describe_differences(state, reference)
    assert not differences, f'{variant}: state_dict differs from the original ALBEF layout\n{differences}'
    assert len(state) == len(reference)


@pytest.mark.parametrize('variant', VARIANTS)
def test_alias_groups_are_one_parameter(full_models, variant):
    model = full_models[variant]
    groups = _reference('shared_storage').get(variant, [])
    state = model.state_dict(keep_vars=True)
    for group in groups:
        tensors = [state[key] for key in group]
        assert all(isinstance(t, torch.nn.Parameter) for t in tensors), group
        assert all(t is tensors[0] for t in tensors), f'{variant}: not one Parameter object: {group}'

    # and nothing else is aliased: the groups of keys sharing one object are exactly the reference's
    by_object = defaultdict(list)
    for key, tensor in state.items():
        by_object[id(tensor)].append(key)
    ours = sorted(sorted(keys) for keys in by_object.values() if len(keys) > 1)
    assert ours == sorted(sorted(group) for group in groups)

    # .parameters() sees each shared tensor once
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)
    param_keys = [k for k, t in state.items() if isinstance(t, torch.nn.Parameter)]
    assert len(params) == len(param_keys) - sum(len(g) - 1 for g in groups)
    reference = _reference(variant)
    buffers = {name for name, _ in model.named_buffers()}
    reference_numel = sum(torch.Size(v['shape']).numel() for k, v in reference.items() if k not in buffers)
    duplicated = sum((len(g) - 1) * torch.Size(reference[g[0]]['shape']).numel() for g in groups)
    assert sum(p.numel() for p in params) == reference_numel - duplicated


def test_nlvr_shares_cross_attention_in_both_encoders(full_models):
    model = full_models['nlvr']
    for encoder in (model.text_encoder, model.text_encoder_m):
        layers = encoder.encoder.layer
        assert len(layers) == 18
        for l in range(6, 18, 2):
            this, other = layers[l].crossattention.self, layers[l + 1].crossattention.self
            assert this.key is not other.key and this.value is not other.value  # distinct Linear modules
            for name in ('key', 'value'):
                assert getattr(this, name).weight is getattr(other, name).weight
                assert getattr(this, name).bias is getattr(other, name).bias
            assert this.query.weight is not other.query.weight
            assert layers[l].crossattention.output.dense.weight is not layers[l + 1].crossattention.output.dense.weight
    # the momentum encoder has its own shared tensors, not the online ones
    assert (model.text_encoder_m.encoder.layer[7].crossattention.self.key.weight
            is not model.text_encoder.encoder.layer[7].crossattention.self.key.weight)


@pytest.mark.parametrize('variant', VARIANTS)
def test_cross_attention_only_from_fusion_layer(full_models, variant):
    model = full_models[variant]
    encoders = {'text_encoder': (model.text_encoder.base_model, 6)}
    if variant == 'vqa':
        encoders['text_decoder'] = (model.text_decoder.base_model, 0)
    for name, (bert, fusion_layer) in encoders.items():
        for i, layer in enumerate(bert.encoder.layer):
            assert hasattr(layer, 'crossattention') == (i >= fusion_layer), f'{name} layer {i}'
