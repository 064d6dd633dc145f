"""VE.py and NLVR.py end to end on the demo world: a short fine-tuning from the demo pre-training
checkpoint (NLVR2: from a text-assignment checkpoint made here with Pretrain_nlvr.py), the
original's logs and checkpoints, and `--evaluate` with two gloo processes reproducing the logged
accuracies, counting every example once (the val files have an odd number of items, so a padded
sampler would count one twice)."""
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import run_script
from test_vqa import assert_ok, read_json, write_demo_config


def split_log(output_dir):
    """(JSON lines, the best epoch of the closing 'best epoch: N' line or None)."""
    with open(os.path.join(output_dir, 'log.txt')) as f:
        lines = f.read().splitlines()
    match = re.fullmatch(r'best epoch: (\d+)', lines[-1])
    if match:
        return [json.loads(line) for line in lines[:-1]], int(match.group(1))
    return [json.loads(line) for line in lines], None


def odd_subset(world, name, base):
    items = read_json(os.path.join(world, name))
    items = items[:len(items) - 1 + len(items) % 2]
    path = base / f'odd_{name}'
    with open(path, 'w') as f:
        json.dump(items, f)
    return str(path), len(items)


@pytest.fixture(scope='module')
def runs(pretrained_demo, tmp_path_factory):
    base = tmp_path_factory.mktemp('ve_nlvr')
    world, pretrained = pretrained_demo['world'], pretrained_demo['checkpoint']
    # NLVR2 runs on the pre-training world (its val and test pairs come from images pre-training never
    # saw): it takes its 1200 training pairs to learn the statements (on the small world's 360 it stayed
    # near 0.55), and its 200 test pairs measure the accuracy to about +-0.035
    nlvr_world = pretrained_demo['pretrain_world']
    common = dict(num_workers=0, print_freq=50)
    epochs = {'schedular': {'epochs': 3}}  # the demo configs have 4
    ve_val, ve_val_size = odd_subset(world, 've_dev.json', base)
    nlvr_val, nlvr_val_size = odd_subset(nlvr_world, 'nlvr_dev.json', base)
    ve_config = write_demo_config('VE', world, base / 'VE.yaml', val_file=ve_val, **common, **epochs)
    nlvr_config = write_demo_config('NLVR', nlvr_world, base / 'NLVR.yaml', val_file=[nlvr_val], **common, **epochs)
    ta_config = write_demo_config('NLVR_pretrain', nlvr_world, base / 'NLVR_pretrain.yaml', **common)
    out = {name: base / name for name in ('ve', 've_eval', 'ta', 'nlvr', 'nlvr_eval')}
    stdout = {}

    def ve():
        result = run_script('VE.py', '--config', ve_config, '--checkpoint', pretrained, '--output_dir', out['ve'],
                            '--device', 'cpu')
        assert_ok(result)
        assert_ok(run_script('VE.py', '--config', ve_config, '--checkpoint', out['ve'] / 'checkpoint_best.pth',
                             '--output_dir', out['ve_eval'], '--device', 'cpu', '--evaluate', nproc=2))

    def nlvr():
        assert_ok(run_script('Pretrain_nlvr.py', '--config', ta_config, '--checkpoint', pretrained,
                             '--output_dir', out['ta'], '--device', 'cpu'))
        ta_checkpoint = out['ta'] / sorted(p for p in os.listdir(out['ta']) if p.startswith('checkpoint_'))[-1]
        result = run_script('NLVR.py', '--config', nlvr_config, '--checkpoint', ta_checkpoint,
                            '--output_dir', out['nlvr'], '--device', 'cpu')
        assert_ok(result)
        stdout['nlvr'] = result.stdout
        out['ta_checkpoint'] = ta_checkpoint
        assert_ok(run_script('NLVR.py', '--config', nlvr_config, '--checkpoint', out['nlvr'] / 'checkpoint_best.pth',
                             '--output_dir', out['nlvr_eval'], '--device', 'cpu', '--evaluate', nproc=2))

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(ve), pool.submit(nlvr)]:
            future.result()
    return {**out, 'stdout': stdout, 've_val_size': ve_val_size, 'nlvr_val_size': nlvr_val_size,
            'nlvr_config': nlvr_config}


@pytest.mark.parametrize('task', ['ve', 'nlvr'])
def test_log_format_and_best_epoch(runs, task):
    stats, best_epoch = split_log(runs[task])
    epochs = len(stats)
    assert [s['epoch'] for s in stats] == list(range(epochs)) and epochs >= 2
    for s in stats:
        assert set(s) == {'train_lr', 'train_loss', 'val_acc', 'test_acc', 'epoch'}
        # JSON numbers: the loss and accuracies rounded to 4 decimals, the lr to 4 significant digits
        assert all(type(s[k]) is float for k in ('train_lr', 'train_loss', 'val_acc', 'test_acc')), s
        assert all(round(s[k], 4) == s[k] for k in ('train_loss', 'val_acc', 'test_acc')), s
        assert s['train_lr'] > 0 and float(f"{s['train_lr']:.4g}") == s['train_lr'], s
    val = [s['val_acc'] for s in stats]
    assert best_epoch == val.index(max(val))  # the first epoch with the best val accuracy
    assert stats[-1]['train_loss'] < stats[0]['train_loss']


def test_fine_tuning_keeps_the_best_and_the_last_checkpoint(runs):
    for task in ('ve', 'nlvr'):
        stats, best_epoch = split_log(runs[task])
        assert {p for p in os.listdir(runs[task]) if p.endswith('.pth')} == {'checkpoint_best.pth',
                                                                            'checkpoint_last.pth'}
        best = torch.load(runs[task] / 'checkpoint_best.pth', map_location='cpu', weights_only=False)
        last = torch.load(runs[task] / 'checkpoint_last.pth', map_location='cpu', weights_only=False)
        assert best['epoch'] == best_epoch and last['epoch'] == len(stats) - 1


def test_ve_learns_above_chance(runs):
    stats, best_epoch = split_log(runs['ve'])
    # three balanced classes: chance is 1/3
    assert stats[best_epoch]['test_acc'] > 1 / 3 + 0.25, stats
    assert stats[-1]['test_acc'] > 1 / 3 + 0.2, stats


def test_nlvr_learns_above_chance(runs):
    stats, best_epoch = split_log(runs['nlvr'])
    # True and False are balanced within every statement template of the demo (test_toy), so a
    # model that reads only the words scores 1/2
    assert stats[best_epoch]['test_acc'] > 0.5 + 0.1, stats


@pytest.mark.parametrize('task', ['ve', 'nlvr'])
def test_two_process_evaluate_reproduces_the_logged_accuracy(runs, task):
    stats, best_epoch = split_log(runs[task])
    evaluated, no_best = split_log(runs[f'{task}_eval'])
    assert no_best is None
    assert evaluated == [{'val_acc': stats[best_epoch]['val_acc'], 'test_acc': stats[best_epoch]['test_acc'],
                          'epoch': 0}]
    # an odd-sized val split: an accuracy with one example counted twice could not be reproduced
    assert runs[f'{task}_val_size'] % 2 == 1


def test_nlvr_momentum_initialisation(runs):
    """Faithful: the momentum encoders keep their pre-load weights (the original's copy-then-load
    order); `nlvr_momentum_from_checkpoint: true` starts them from the text-assignment weights.
    Either way the TA checkpoint, once its missing heads are filled in, loads strictly."""
    from configuration import load_yaml
    from models.checkpoint import load_checkpoint, read_state_dict
    from models.model_nlvr import ALBEF
    from models.tokenization_bert import BertTokenizer

    assert 'momentum encoders initialised' not in runs['stdout']['nlvr']
    config = load_yaml(runs['nlvr_config'])
    tokenizer = BertTokenizer.from_pretrained(config['text_encoder'])
    ta = read_state_dict(str(runs['ta_checkpoint']))

    torch.manual_seed(0)
    faithful = ALBEF(config=config, tokenizer=tokenizer)
    initial = faithful.text_encoder_m.encoder.layer[4].crossattention.self.query.weight.clone()
    load_checkpoint(faithful, str(runs['ta_checkpoint']), sync_momentum=False)
    loaded = faithful.text_encoder.encoder.layer[4].crossattention.self.query.weight
    assert torch.equal(loaded, ta['text_encoder.encoder.layer.4.crossattention.self.query.weight'])
    assert torch.equal(faithful.text_encoder_m.encoder.layer[4].crossattention.self.query.weight, initial)
    assert not torch.equal(initial, loaded)

    fixed = ALBEF(config=config, tokenizer=tokenizer)
    load_checkpoint(fixed, str(runs['ta_checkpoint']), sync_momentum=True)
    for online, momentum in zip(fixed.text_encoder.parameters(), fixed.text_encoder_m.parameters()):
        assert torch.equal(online, momentum)
    assert torch.equal(fixed.visual_encoder_m.pos_embed, ta['visual_encoder.pos_embed'])

    own = faithful.state_dict()
    assert {k.split('.')[0] for k in ta if k not in own} == {'vision_proj', 'text_proj', 'temp', 'ta_head'}
    filled = {**{k: v for k, v in own.items() if k not in ta}, **{k: v for k, v in ta.items() if k in own}}
    assert {k.split('.')[0] for k in own if k not in ta} == {'cls_head', 'cls_head_m', 'visual_encoder_m',
                                                             'text_encoder_m'}
    faithful.load_state_dict(filled, strict=True)
