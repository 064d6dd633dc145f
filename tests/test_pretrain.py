"""Pretrain.py and Pretrain_nlvr.py end to end on the demo world: every way of starting them,
the loss falling, exact resume after SIGKILL, and the text-assignment checkpoint feeding NLVR."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script

SMALL = dict(batch_size=8, queue_size=32, num_workers=0, print_freq=2)


def read_log(output_dir):
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def epoch_loss(stats):
    return sum(v for k, v in stats.items() if k.startswith('train_loss'))


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def initial_losses(config_path, seeds, batch_size):
    """The summed pre-training loss of the first step, before any update (alpha 0, as the ramp
    starts), for fresh models and batches drawn with each seed: one forward pass each."""
    from configuration import load_yaml
    from dataset import CaptionCollate, create_dataset, normalize
    from models.model_pretrain import ALBEF
    from models.tokenization_bert import BertTokenizer
    config = load_yaml(config_path)
    tokenizer = BertTokenizer.from_pretrained(config['text_encoder'])
    dataset = create_dataset('pretrain', config, uint8=True)
    collate = CaptionCollate(tokenizer)
    losses = []
    for seed in seeds:
        random.seed(seed)  # as the scripts seed: python's (a caption of several), numpy's, torch's
        np.random.seed(seed)
        torch.manual_seed(seed)
        model = ALBEF(config=config, text_encoder=None, tokenizer=tokenizer, init_deit=False).train()
        batch = collate([dataset[int(i)] for i in torch.randperm(len(dataset))[:batch_size]])
        with torch.no_grad():  # (the masks drawn in the model, after the ITM noise)
            losses.append(sum(loss.item() for loss in model(normalize(batch.image), batch.text, alpha=0)))
    return torch.tensor(losses, dtype=torch.float64)


def test_pretrain_one_process_loss_falls(demo_config, tmp_path):
    # 8 short epochs (56 steps) at the demo's former peak rate, so the fall is clear of noise
    config = demo_config('Pretrain', **SMALL, optimizer={'lr': 5e-4}, schedular={'epochs': 8, 'lr': 5e-4})
    out = tmp_path / 'out'
    result = run_script('Pretrain.py', '--config', config, '--output_dir', out, '--device', 'cpu')
    assert_ok(result)
    stats = read_log(out)
    assert [s['epoch'] for s in stats] == list(range(8))
    assert {'train_lr', 'train_loss_mlm', 'train_loss_ita', 'train_loss_itm'} <= set(stats[0])
    # The baseline: the summed loss before any update, over 5 seeds (model initialisation, batch,
    # masks, dropout): one batch of 8 has a spread of about 1.4 around a mean of about 10. Had the
    # training changed nothing, the last epoch's loss would be a mean of 7 such batches, within about
    # spread / sqrt(7) of the baseline's mean; it must lie 3 of those below it. (Measured: 10.06 +-
    # 1.44, so below 8.43; the last epoch gives 7.98.)
    baseline = initial_losses(config, range(5), SMALL['batch_size'])
    mean, spread = baseline.mean().item(), baseline.std().item()
    final = epoch_loss(stats[-1])
    steps = 7  # an epoch: 60 captions in batches of 8, the last incomplete one dropped
    print(f'loss before training {mean:.3f} +- {spread:.3f} (5 seeds), last epoch {final:.3f}')
    assert final < mean - 3 * spread / steps ** 0.5, (baseline, stats)
    # keep_checkpoints: 3 in the demo config
    assert sorted(os.listdir(out)) == [f'checkpoint_{e:02d}.pth' for e in (5, 6, 7)] + ['config.yaml', 'log.txt',
                                                                                      'tensorboard']
    # the step log: losses, learning rate, throughput and time remaining
    step_lines = [line for line in result.stdout.splitlines() if line.startswith('Train Epoch')]
    assert step_lines and all(k in step_lines[0] for k in ('loss_mlm', 'lr:', 'samples/s:', 'eta:'))
    assert 'single process on cpu' in result.stdout
    checkpoint = torch.load(out / 'checkpoint_07.pth', map_location='cpu', weights_only=False)
    assert set(checkpoint) >= {'model', 'optimizer', 'lr_scheduler', 'config', 'epoch'} and checkpoint['epoch'] == 7


@pytest.mark.parametrize('launcher', ['torchrun', 'launch'])
def test_pretrain_two_processes(demo_config, tmp_path, launcher):
    config = demo_config('Pretrain', **SMALL, schedular={'epochs': 1})
    out = tmp_path / 'out'
    result = run_script('Pretrain.py', '--config', config, '--output_dir', out, '--device', 'cpu',
                        nproc=2, launcher=launcher)
    assert_ok(result)
    assert 'process 1 of 2 on cpu (gloo)' in result.stdout + result.stderr
    assert sorted(os.listdir(out)) == ['checkpoint_00.pth', 'config.yaml', 'log.txt', 'tensorboard']
    assert len(read_log(out)) == 1
    assert len(os.listdir(out / 'tensorboard')) == 1  # rank 0's event file only
    # only rank 0 logs the step lines
    assert (result.stdout + result.stderr).count('Train Epoch: [0]  [0/') == 1


def final_state(path):
    checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    return checkpoint['model'], checkpoint['optimizer']['state']


def test_kill_and_resume_is_exact(demo_config, tmp_path):
    config = demo_config('Pretrain', **SMALL, save_every_steps=2, schedular={'epochs': 2})
    reference = tmp_path / 'reference'
    assert_ok(run_script('Pretrain.py', '--config', config, '--output_dir', reference, '--device', 'cpu'))

    out = tmp_path / 'interrupted'
    command = [sys.executable, os.path.join(ROOT, 'Pretrain.py'), '--config', config, '--output_dir', str(out),
               '--device', 'cpu']
    # the same one thread as run_script: a different thread count changes the float sums
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / 'checkpoint_last.pth'
    deadline = time.time() + 300
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert last.exists() and not (out / 'checkpoint_01.pth').exists(), 'the run was not interrupted mid-way'

    result = run_script('Pretrain.py', '--config', config, '--output_dir', out, '--device', 'cpu', '--resume')
    assert_ok(result)
    assert 'resumed from' in result.stdout
    model, optimizer = final_state(out / 'checkpoint_01.pth')
    model_ref, optimizer_ref = final_state(reference / 'checkpoint_01.pth')
    assert model.keys() == model_ref.keys()
    for key in model_ref:
        assert torch.equal(model[key], model_ref[key]), key
    for index in optimizer_ref:
        for name, value in optimizer_ref[index].items():
            assert torch.equal(optimizer[index][name], value)
    assert read_log(out)[-1] == read_log(reference)[-1]
    # TensorBoard shows the resumed run's losses and lr exactly as the uninterrupted run's, one point per
    # step: what the killed process wrote past its checkpoint is purged
    from test_logging import read_scalars
    resumed, uninterrupted = read_scalars(out / 'tensorboard'), read_scalars(reference / 'tensorboard')
    def steps(scalars):
        return {tag: [step for step, _ in points] for tag, points in scalars.items()}
    assert steps(resumed) == steps(uninterrupted)
    exact = [tag for tag in uninterrupted if tag.startswith(('train/loss', 'train/lr', 'epoch/'))]
    assert len(exact) == 8 and all(resumed[tag] == uninterrupted[tag] for tag in exact)


def test_text_assignment_pretraining_feeds_nlvr(demo_config, tmp_path):
    from models.checkpoint import load_checkpoint
    from models.model_nlvr import ALBEF
    from models.tokenization_bert import BertTokenizer
    from configuration import load_yaml

    pretrain_out = tmp_path / 'pretrain'
    assert_ok(run_script('Pretrain.py', '--config', demo_config('Pretrain', **SMALL, schedular={'epochs': 1},
                                                                log_to='none'),
                         '--output_dir', pretrain_out, '--device', 'cpu'))
    # log_to none: no TensorBoard event files
    assert sorted(os.listdir(pretrain_out)) == ['checkpoint_00.pth', 'config.yaml', 'log.txt']
    assert load_yaml(pretrain_out / 'config.yaml')['log_to'] == 'none'
    config = demo_config('NLVR_pretrain', batch_size=8, num_workers=0, schedular={'epochs': 1})
    out = tmp_path / 'ta'
    result = run_script('Pretrain_nlvr.py', '--config', config, '--checkpoint', pretrain_out / 'checkpoint_00.pth',
                        '--output_dir', out, '--device', 'cpu')
    assert_ok(result)
    assert 'converted from pre-training: ta' in result.stdout
    assert read_log(out)[0]['train_loss']

    nlvr_config = dict(load_yaml(config), distill=True)
    model = ALBEF(config=nlvr_config, tokenizer=BertTokenizer.from_pretrained(nlvr_config['text_encoder']))
    report = load_checkpoint(model, str(out / 'checkpoint_00.pth'), sync_momentum=False)
    assert {k.split('.')[0] for k in report.unexpected_keys} == {'vision_proj', 'text_proj', 'temp', 'ta_head'}
    assert {k.split('.')[0] for k in report.missing_keys} == {'cls_head', 'cls_head_m', 'visual_encoder_m',
                                                              'text_encoder_m'}
