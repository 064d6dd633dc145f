"""configs/*.yaml and configs/config_bert.json match the original's values (docs/DESIGN.md, "Configs")."""
import os

import pytest
from ruamel.yaml import YAML

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

# name -> (optimizer/base lr, epochs, min_lr, warmup_epochs, expected top-level values)
EXPECTED = {
    'Pretrain': (1e-4, 30, 1e-5, 20, dict(
        train_file=['data/coco.json', 'data/vg.json', 'data/cc12m.json', 'data/cc3m_train.json',
                    'data/cc3m_val.json', 'data/sbu.json'],
        image_res=256, vision_width=768, embed_dim=256, batch_size=64, temp=0.07,
        mlm_probability=0.15, queue_size=65536, momentum=0.995, alpha=0.4)),
    'NLVR_pretrain': (2e-5, 1, 1e-5, 1, dict(
        train_file=['data/coco.json', 'data/vg.json', 'data/cc3m_train.json',
                    'data/cc3m_val.json', 'data/sbu.json'],
        image_res=256, vision_width=768, embed_dim=256, batch_size=64)),
    'Retrieval_coco': (1e-5, 5, 1e-6, 1, dict(
        train_file=['data/coco_train.json'], val_file='data/coco_val.json',
        test_file='data/coco_test.json', image_res=384, batch_size_train=32, batch_size_test=64,
        queue_size=65536, momentum=0.995, vision_width=768, embed_dim=256, temp=0.07,
        k_test=256, alpha=0.4, distill=True, warm_up=True)),
    'Retrieval_flickr': (1e-5, 10, 1e-6, 1, dict(
        train_file=['data/flickr30k_train.json'], val_file='data/flickr30k_val.json',
        test_file='data/flickr30k_test.json', image_res=384, batch_size_train=32,
        batch_size_test=64, queue_size=65536, momentum=0.995, vision_width=768, embed_dim=256,
        temp=0.07, k_test=128, alpha=0.4, distill=True, warm_up=True)),
    'VQA': (2e-5, 8, 1e-6, 4, dict(
        train_file=['data/vqa_train.json', 'data/vqa_val.json', 'data/vg_qa.json'],
        test_file=['data/vqa_test.json'], answer_list='data/answer_list.json',
        image_res=384, batch_size_train=32, batch_size_test=16, k_test=128, alpha=0.4,
        distill=True, warm_up=True, eos='[SEP]')),
    'VE': (2e-5, 5, 1e-6, 1, dict(
        train_file='data/ve_train.json', val_file='data/ve_dev.json', test_file='data/ve_test.json',
        image_res=384, batch_size_train=32, batch_size_test=64, alpha=0.4, distill=True,
        warm_up=False)),
    'NLVR': (2e-5, 10, 1e-6, 1, dict(
        train_file=['data/nlvr_train.json'], val_file=['data/nlvr_dev.json'],
        test_file=['data/nlvr_test.json'], image_res=384, batch_size=16, alpha=0.4,
        distill=True, warm_up=True, eval_ema=False)),
    'Grounding': (1e-5, 5, 1e-6, 1, dict(
        train_file=['data/refcoco+_train.json'],
        test_file=['data/refcoco+_val.json', 'data/refcoco+_test.json'],
        refcoco_data='data', det_file='data/refcoco+/dets.json',
        coco_file='data/refcoco+/cocos.json', image_res=384, batch_size=32, queue_size=65536,
        momentum=0.995, vision_width=768, embed_dim=256, temp=0.07, alpha=0.4, distill=True,
        warm_up=True)),
}
IMAGE_ROOTS = {'Retrieval_coco': ['image_root'], 'Retrieval_flickr': ['image_root'],
               'VQA': ['vqa_root', 'vg_root'], 'VE': ['image_root'], 'NLVR': ['image_root'],
               'Grounding': ['image_root']}


def load(name):
    with open(os.path.join(CONFIGS, name + '.yaml')) as f:
        return YAML(typ='safe').load(f)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_yaml(name):
    lr, epochs, min_lr, warmup_epochs, values = EXPECTED[name]
    cfg = load(name)
    assert cfg['bert_config'] == 'configs/config_bert.json'
    for key, value in values.items():
        assert cfg[key] == value and type(cfg[key]) is type(value), key
    for key in IMAGE_ROOTS.get(name, []):
        assert isinstance(cfg[key], str) and cfg[key].endswith('/')

    assert cfg['optimizer'] == {'opt': 'adamW', 'lr': lr, 'weight_decay': 0.02}
    assert cfg['schedular'] == {'sched': 'cosine', 'lr': lr, 'epochs': epochs, 'min_lr': min_lr,
                                'decay_rate': 1, 'warmup_lr': 1e-5,
                                'warmup_epochs': warmup_epochs, 'cooldown_epochs': 0}
    for section in ('optimizer', 'schedular'):
        for key in ('lr', 'min_lr', 'warmup_lr', 'weight_decay'):
            if key in cfg[section]:
                assert isinstance(cfg[section][key], float), (section, key)

    expected_keys = {'bert_config', 'optimizer', 'schedular', *values, *IMAGE_ROOTS.get(name, [])}
    assert set(cfg) == expected_keys


def test_config_bert():
    from transformers import BertConfig
    config = BertConfig.from_json_file(os.path.join(CONFIGS, 'config_bert.json'))
    assert config.fusion_layer == 6 and config.encoder_width == 768
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.vocab_size) == (768, 12, 12, 3072, 30522)
    assert (config.max_position_embeddings, config.type_vocab_size, config.pad_token_id) == (512, 2, 0)
    assert config.hidden_act == 'gelu' and config.layer_norm_eps == 1e-12
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.1
    assert config.initializer_range == 0.02


def test_the_checks_accept_every_original_config(monkeypatch):
    """configs/*.yaml (the original's) pass every key and value check of their task (tasks.py), on
    8 processes as the original ran them."""
    import configuration
    from dataset.check import infer_task
    monkeypatch.chdir(os.path.dirname(CONFIGS))  # bert_config is relative to the repository
    for name in sorted(EXPECTED):
        path = os.path.join(CONFIGS, name + '.yaml')
        config = configuration.load_yaml(path)
        configuration.check_config(config, path, infer_task(config), processes=8)
