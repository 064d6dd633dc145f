"""TensorBoard and W&B logging: a real demo pre-training run (stopped after one epoch, then resumed
for a second), read back with TensorBoard's own EventAccumulator, must hold exactly the numbers of
the printed step lines and of log.txt, at the global step; W&B offline holds the same numbers; the
`log_to` option's values and errors (`log_to: none` is run in test_pretrain.py); every value of
log.txt a JSON number."""
import argparse
import glob
import json
import os
import re
import struct

import numpy as np
import pytest
import torch

import engine
import engine.options
from dataset import Batch
import Pretrain
import tracking
from conftest import run_script

SMALL = dict(batch_size=8, queue_size=32, num_workers=0, print_freq=2)
STEP_LINE = re.compile(r'Train Epoch: \[(\d+)\]\s+\[\s*(\d+)/(\d+)\]\s+eta: \S+\s+(.*)')
# the step line's column names and the tags they are written under
COLUMNS = {'time': 'time', 'data': 'data_time', 'samples/s': 'samples_per_s', 'max mem': 'max_mem_mb'}


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def step_lines(stdout):
    """[(global step, {tag: (printed value, half a unit of its last printed digit)})] of the step lines."""
    steps = []
    for line in stdout.splitlines():
        match = STEP_LINE.fullmatch(line)
        if not match:
            continue
        epoch, i, total = map(int, match.groups()[:3])
        values = {}
        for column in match.group(4).split('  '):
            name, text = re.fullmatch(r'(.+?): ([-\d.]+)(?: \([-\d.]+\)|MB)?', column).groups()
            decimals = len(text.split('.')[1]) if '.' in text else 0
            values['train/' + COLUMNS.get(name, name)] = (float(text), 0.5 * 10 ** -decimals)
        steps.append((epoch * total + i, values))
    return steps


def read_log(output_dir):
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def expected_scalars(stdouts, output_dir):
    """{tag: [(step, value, tolerance)]} from the step lines of the runs and the lines of log.txt."""
    expected = {}
    for stdout in stdouts:
        for step, values in step_lines(stdout):
            for tag, (value, tolerance) in values.items():
                expected.setdefault(tag, []).append((step, value, tolerance))
    for stats in read_log(output_dir):
        for key, value in stats.items():
            if key != 'epoch':
                # the number itself; event files store float32
                expected.setdefault(f'epoch/{key}', []).append((stats['epoch'], value, 1e-6 * abs(value)))
    return expected


def assert_same(actual, expected):
    """actual {tag: [(step, value)]} against expected_scalars()."""
    assert set(actual) == set(expected)
    for tag, points in expected.items():
        assert [step for step, _ in actual[tag]] == [step for step, _, _ in points], tag
        for (step, value), (_, want, tolerance) in zip(actual[tag], points):
            assert abs(value - want) <= tolerance + 1e-7 * abs(want), (tag, step, value, want)


def read_scalars(log_dir):
    """{tag: [(step, value)]} of every event file under log_dir, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir))  # reads every event file of the folder, in order
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def test_tensorboard_holds_the_step_lines_and_log_txt_across_a_resume(demo_config, tmp_path):
    out = tmp_path / 'out'
    first = run_script('Pretrain.py', '--config', demo_config('Pretrain', **SMALL, schedular={'epochs': 1}),
                       '--output_dir', out, '--device', 'cpu')
    assert_ok(first)
    # the same run continued for a second epoch: its global steps go on from the first's
    second = run_script('Pretrain.py', '--config', demo_config('Pretrain', **SMALL, schedular={'epochs': 2}),
                        '--output_dir', out, '--device', 'cpu', '--resume')
    assert_ok(second)
    assert 'resumed from' in second.stdout
    assert len(os.listdir(out / 'tensorboard')) == 2  # one event file per process

    expected = expected_scalars([first.stdout, second.stdout], out)
    steps_per_epoch = int(STEP_LINE.search(first.stdout).group(3))
    train_steps = [step for step, _, _ in expected['train/loss_mlm']]
    # every print_freq (2) steps and the last of each epoch, numbered on across the epochs
    assert train_steps == [e * steps_per_epoch + i for e in (0, 1) for i in range(steps_per_epoch)
                           if i % 2 == 0 or i == steps_per_epoch - 1]
    assert set(expected) == {f'train/{name}' for name in ('lr', 'loss_mlm', 'loss_ita', 'loss_itm', 'time',
                                                          'data_time', 'samples_per_s')} \
        | {f'epoch/train_{name}' for name in ('lr', 'loss_mlm', 'loss_ita', 'loss_itm')}

    assert_same(read_scalars(out / 'tensorboard'), expected)


def read_wandb_records(path):
    """The protobuf records of a W&B run file (`run-<id>.wandb`): a 7-byte header (':W&B', a magic
    number, a version), then LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte
    header (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, 'rb').read()
    assert data[:4] == b':W&B' and data[6] == 0, 'unknown W&B file format'
    records, pending, position = [], b'', 7
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack('<IHB', data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_holds_the_same_numbers(demo_config, tmp_path):
    pytest.importorskip('wandb')
    out = tmp_path / 'out'
    wandb_home = {name: str(tmp_path / 'wandb_home') for name in ('WANDB_CONFIG_DIR', 'WANDB_CACHE_DIR',
                                                                  'WANDB_DATA_DIR')}
    result = run_script('Pretrain.py', '--config', demo_config('Pretrain', **SMALL, schedular={'epochs': 1}),
                        '--output_dir', out, '--device', 'cpu', '--log_to', 'tensorboard,wandb',
                        env={'WANDB_MODE': 'offline', **wandb_home})
    assert_ok(result)
    files = glob.glob(str(out / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    assert len(files) == 1, os.listdir(out)
    records = read_wandb_records(files[0])

    actual = {}
    for record in records:
        if record.WhichOneof('record_type') != 'history':
            continue
        row = {item.key or '.'.join(item.nested_key): json.loads(item.value_json)
               for item in record.history.item}
        axis = 'global_step' if 'global_step' in row else 'epoch'
        for tag, value in row.items():
            if tag.startswith(('train/', 'epoch/')):
                actual.setdefault(tag, []).append((row[axis], value))
    assert_same(actual, expected_scalars([result.stdout], out))
    # the run's effective config goes with it
    config = next(r.run.config for r in records if r.WhichOneof('record_type') == 'run')
    logged = {item.key or '.'.join(item.nested_key): json.loads(item.value_json) for item in config.update}
    assert logged['log_to'] == 'tensorboard,wandb' and logged['batch_size'] == 8


@pytest.mark.parametrize('value, flag, expected', [
    (None, None, ('tensorboard',)),
    ('wandb', None, ('wandb',)),
    (['wandb', 'tensorboard'], None, ('tensorboard', 'wandb')),
    (False, None, ()),                        # YAML `log_to: off`
    ('tensorboard', 'none', ()),              # the flag wins over the config key
    (None, ' TensorBoard , wandb ', ('tensorboard', 'wandb')),
])
def test_log_to_values(value, flag, expected):
    if 'wandb' in expected:
        pytest.importorskip('wandb')
    config = {} if value is None else {'log_to': value}
    args = argparse.Namespace(config='c.yaml', log_to=flag)
    assert engine.options.log_to_option(args, config) == expected
    assert config['log_to'] == (','.join(expected) or 'none')


@pytest.mark.parametrize('value, flag, message', [
    (None, 'tensorbord', "--log_to: unknown logger 'tensorbord' (expected tensorboard, wandb or none)"),
    (['tensorboard', 'mlflow'], None, "{config}: log_to: unknown logger 'mlflow' (expected tensorboard, wandb "
                                      "or none)"),
    ('none,wandb', None, "{config}: log_to: 'none' cannot be combined with other loggers, got 'none,wandb'"),
    (3, None, "{config}: log_to: expected a comma-separated string or a list of tensorboard, wandb or none, or "
             "null, got 3"),
])
def test_bad_log_to_is_a_config_error(demo_config, tmp_path, capsys, value, flag, message):
    overrides = {} if value is None else {'log_to': value}
    config = demo_config('Pretrain', **SMALL, **overrides)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'log.txt').write_text('{"epoch": 0}\n')
    argv = ['--config', config, '--output_dir', str(out), '--device', 'cpu'] + (['--log_to', flag] if flag else [])
    with pytest.raises(SystemExit) as exit_info:
        engine.launch(Pretrain.main, Pretrain.get_parser(), argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ['error: ' + message.format(config=config)]
    assert os.listdir(out) == ['log.txt'] and (out / 'log.txt').read_text() == '{"epoch": 0}\n'


def test_a_resumed_writer_hides_what_an_interrupted_one_wrote_past_the_resume_step(tmp_path):
    interrupted = tracking.ScalarWriter(str(tmp_path), ('tensorboard',))
    for step in (0, 2, 4, 6):  # killed after step 6, its checkpoint taken at step 6
        interrupted.step(step, {'loss': 10.0 + step})
    interrupted.epoch({'train_loss': 1.5, 'epoch': 0})
    interrupted.close()
    resumed = tracking.ScalarWriter(str(tmp_path), ('tensorboard',))
    for step in (6, 8):  # the same step again first: TensorBoard alone would keep both points
        resumed.step(step, {'loss': 20.0 + step})
    resumed.close()
    assert len(os.listdir(tmp_path / 'tensorboard')) == 2
    assert read_scalars(tmp_path / 'tensorboard') == {'train/loss': [(0, 10.0), (2, 12.0), (4, 14.0), (6, 26.0),
                                                                     (8, 28.0)],
                                                      'epoch/train_loss': [(0, 1.5)]}


def test_a_missing_package_is_named_before_the_run_starts(monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *args: None if name == 'wandb' else
                        find_spec(name, *args))
    with pytest.raises(engine.ConfigError) as error:
        engine.options.log_to_option(argparse.Namespace(config='c.yaml', log_to='tensorboard,wandb'), {})
    assert str(error.value) == '--log_to: wandb is not installed (pip install wandb, or log to none)'


def test_log_stats_writes_json_numbers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = engine.Run(args=None, config={}, output_dir=str(tmp_path))
    run.writer = tracking.ScalarWriter(run.output_dir, ('tensorboard',))
    engine.log_stats(run, {'val_acc': np.float32(0.75), 'test_r_mean': torch.tensor(12.5), 'train_skipped': 3,
                           'epoch': 0})
    engine.log_stats(run, {'val_acc': 0.8125, 'test_r_mean': np.float64(25.0), 'train_skipped': 0, 'epoch': 1})
    with pytest.raises(TypeError, match=r"log_stats: 'val_acc' must be a number, got str '0.8123'"):
        engine.log_stats(run, {'val_acc': '0.8123', 'epoch': 2})
    run.writer.close()
    lines = (tmp_path / 'log.txt').read_text().splitlines()
    assert lines == ['{"val_acc": 0.75, "test_r_mean": 12.5, "train_skipped": 3, "epoch": 0}',
                     '{"val_acc": 0.8125, "test_r_mean": 25.0, "train_skipped": 0, "epoch": 1}']
    events = EventAccumulator(str(tmp_path / 'tensorboard'))
    events.Reload()
    assert sorted(events.Tags()['scalars']) == ['epoch/test_r_mean', 'epoch/train_skipped', 'epoch/val_acc']
    assert [(e.step, e.value) for e in events.Scalars('epoch/val_acc')] == [(0, 0.75), (1, 0.8125)]
    assert [(e.step, e.value) for e in events.Scalars('epoch/test_r_mean')] == [(0, 12.5), (1, 25.0)]


def test_evaluate_accuracy_is_a_rounded_number(tokenizer):
    class Model(torch.nn.Module):
        """Predicts class 1 for every example."""

        def forward(self, image, text, targets, train):
            return torch.tensor([[0.0, 1.0]]).repeat(len(targets), 1)

    run = engine.Run(args=None, config={}, tokenizer=tokenizer)
    # 5 of 7 targets are 1: 0.714285... logged as 0.7143
    targets = [torch.tensor([1, 1, 0]), torch.tensor([1, 1, 1, 0])]
    loader = [Batch(image=torch.zeros(len(t), 3, 4, 4), text=tokenizer(['a cat'] * len(t), return_tensors='pt'),
                    targets=t) for t in targets]
    result = engine.evaluate_accuracy(Model(), loader, run)
    assert result == {'acc': 0.7143} and type(result['acc']) is float


def test_log_every_hands_the_printed_numbers_to_on_log(monkeypatch, capsys):
    import utils
    # a GPU as far as the logger can tell: its peak memory is 300 MiB
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'max_memory_allocated', lambda *args, **kwargs: 300 * 2 ** 20)
    logger = utils.MetricLogger(delimiter='  ')
    logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    calls = []
    for i, loss in logger.log_every([4.0, 2.0, 3.0, 1.0, 5.0], 2, 'Train', samples_per_step=8,
                                    on_log=lambda i, numbers: calls.append((i, numbers))):
        logger.update(lr=0.25 * (i + 1), loss=torch.tensor(loss))
    assert [i for i, _ in calls] == [0, 2, 4]  # every print_freq steps and the last
    assert all(set(numbers) == {'lr', 'loss', 'time', 'data_time', 'samples_per_s', 'max_mem_mb'}
               for _, numbers in calls)
    assert [numbers['loss'] for _, numbers in calls] == [4.0, 3.0, 3.0]  # medians of [4], [4 2 3], [4 2 3 1 5]
    assert [numbers['lr'] for _, numbers in calls] == [0.25, 0.75, 1.25]
    assert all(numbers['max_mem_mb'] == 300 and numbers['samples_per_s'] == 8 / max(numbers['time'], 1e-9)
               for _, numbers in calls)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('Train  [')]
    assert len(lines) == 3 and all(line.endswith('max mem: 300MB') for line in lines), lines
    assert 'loss: 3.0000 (3.0000)' in lines[2] and 'lr: 1.250000' in lines[2]
