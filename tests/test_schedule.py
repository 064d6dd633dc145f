"""Learning rates, parameter groups and the epoch-0 alpha ramp: the original's reference values
(docs/DESIGN.md, "Optimizer", "Learning-rate schedule", "Alpha and its warm-up")."""
import argparse

import pytest
import torch

import configuration
import engine
from engine.checkpointing import Checkpointer, TrainState
from optim import create_optimizer
from scheduler import create_scheduler


class EpochLoader:
    """Stands in for a training loader (and its sampler): `first_epoch_steps` batches in epoch 0,
    one in every later epoch; each batch is its (epoch, iteration)."""

    def __init__(self, first_epoch_steps):
        self.first_epoch_steps, self.epoch, self.batch_size = first_epoch_steps, 0, 1
        self.sampler = self

    def set_epoch(self, epoch, start=0):
        self.epoch = epoch

    def __len__(self):
        return self.first_epoch_steps if self.epoch == 0 else 1

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(len(self))])


def step_trace(config_path, epochs, iterations_per_epoch, tmp_path, **fit_kwargs):
    """(epoch, iteration, lr, alpha) of each optimizer step, recorded by a stub train_step while
    the real loop (`engine.fit`, with the real optimizer and scheduler of the config) drives the
    schedule and the distillation weight alpha."""
    config = configuration.load_yaml(config_path)
    config['schedular']['epochs'] = epochs
    config['print_freq'] = 10 ** 6
    model = torch.nn.Linear(2, 2)
    optimizer = create_optimizer(config['optimizer'], model)
    scheduler, _ = create_scheduler(config['schedular'], optimizer)
    run = engine.Run(args=argparse.Namespace(seed=0), config=config, output_dir=str(tmp_path),
                     scaler=torch.amp.GradScaler('cpu', enabled=False))
    training = engine.Training(model, model, optimizer, scheduler,
                               Checkpointer(str(tmp_path), model, optimizer, scheduler, config), TrainState())
    trace = []

    def train_step(model, batch, alpha, run, update_momentum=True):
        epoch, i = batch
        trace.append((epoch, i, optimizer.param_groups[0]['lr'], float(alpha)))
        assert optimizer.param_groups[0]['lr'] == optimizer.param_groups[1]['lr']
        return {'loss': model(torch.ones(1, 2)).sum()}

    engine.fit(run, training, EpochLoader(iterations_per_epoch), train_step, **fit_kwargs)
    assert len(trace) == iterations_per_epoch + epochs - 1
    return trace


def lr_trace(config_path, epochs, iterations_per_epoch, tmp_path):
    """The lr each optimizer step uses (see `step_trace`)."""
    return [(epoch, i, lr) for epoch, i, lr, _ in step_trace(config_path, epochs, iterations_per_epoch, tmp_path)]


def epoch_lrs(trace):
    return [lr for epoch, i, lr in trace if epoch > 0]


def at(trace, iteration):
    return next(lr for epoch, i, lr in trace if epoch == 0 and i == iteration)


def test_pretrain_warmup_and_cosine(tmp_path):
    trace = lr_trace('configs/Pretrain.yaml', 30, 2101, tmp_path)
    for i in (0, 1, 50, 100):
        assert at(trace, i) == pytest.approx(1e-5, abs=1e-12)
    for block in range(1, 20):
        for i in (100 * block + 1, 100 * block + 100):
            assert at(trace, i) == pytest.approx(1e-5 + 4.5e-6 * block, abs=1e-12)
    assert at(trace, 2001) == pytest.approx(1e-4, abs=1e-12)
    lrs = epoch_lrs(trace)
    assert lrs[0] == pytest.approx(9.9753e-5, abs=1e-9)
    assert lrs[14] == pytest.approx(5.5e-5, abs=1e-12)
    assert lrs[28] == pytest.approx(1.0247e-5, abs=1e-9)


def test_vqa(tmp_path):
    trace = lr_trace('configs/VQA.yaml', 8, 501, tmp_path)
    assert [at(trace, i) for i in (0, 100, 101, 200, 201, 300, 301, 400, 401)] == pytest.approx(
        [1e-5, 1e-5, 1.25e-5, 1.25e-5, 1.5e-5, 1.5e-5, 1.75e-5, 1.75e-5, 2e-5], abs=1e-12)
    assert epoch_lrs(trace) == pytest.approx(
        [1.92769e-5, 1.72175e-5, 1.41355e-5, 1.05e-5, 6.8645e-6, 3.7825e-6, 1.7231e-6], abs=1e-10)


@pytest.mark.parametrize('config, epochs, expected', [
    ('configs/VE.yaml', 5, [1.81857e-5, 1.34357e-5, 7.5643e-6, 2.8143e-6]),
    ('configs/NLVR.yaml', 10, [1.9535e-5, 1.81857e-5, 1.6084e-5, 1.34357e-5, 1.05e-5, 7.5643e-6, 4.9160e-6,
                               2.8143e-6, 1.4650e-6]),
])
def test_two_step_warmup_then_cosine(config, epochs, expected, tmp_path):
    trace = lr_trace(config, epochs, 201, tmp_path)
    assert [at(trace, i) for i in (0, 100, 101, 200)] == pytest.approx([1e-5, 1e-5, 2e-5, 2e-5], abs=1e-12)
    assert epoch_lrs(trace) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize('config, epochs, expected', [
    ('configs/Retrieval_flickr.yaml', 10, [9.7798e-6, 9.1406e-6, 8.145e-6, 6.8906e-6, 5.5e-6, 4.1094e-6, 2.855e-6,
                                           1.8594e-6, 1.2202e-6]),
    ('configs/Retrieval_coco.yaml', 5, [9.1406e-6, 6.8906e-6, 4.1094e-6, 1.8594e-6]),
    ('configs/Grounding.yaml', 5, [9.1406e-6, 6.8906e-6, 4.1094e-6, 1.8594e-6]),
])
def test_constant_warmup_then_cosine(config, epochs, expected, tmp_path):
    trace = lr_trace(config, epochs, 201, tmp_path)
    assert {lr for epoch, i, lr in trace if epoch == 0} == {1e-5}
    assert epoch_lrs(trace) == pytest.approx(expected, abs=1e-10)


def test_text_assignment_pretraining(tmp_path):
    trace = lr_trace('configs/NLVR_pretrain.yaml', 1, 301, tmp_path)
    assert [at(trace, i) for i in (0, 100, 101, 300)] == pytest.approx([1e-5, 1e-5, 2e-5, 2e-5], abs=1e-12)


@pytest.mark.parametrize('ramp', [True, False])
def test_alpha_ramps_up_over_epoch_0(ramp, tmp_path):
    """alpha (0.4) grows linearly over epoch 0, alpha * i / steps at step i, and is whole from
    epoch 1 on (the original's warm_up); without the ramp (warm_up: false) it is whole throughout."""
    trace = step_trace('configs/Retrieval_flickr.yaml', 3, 5, tmp_path, alpha_ramp=ramp)
    alphas = [(epoch, i, alpha) for epoch, i, _, alpha in trace]
    ramped = [0.0, 0.08, 0.16, 0.24, 0.32] if ramp else [0.4] * 5
    assert alphas == [(0, i, pytest.approx(a, abs=1e-12)) for i, a in enumerate(ramped)] + [(1, 0, 0.4), (2, 0, 0.4)]


def test_parameter_groups():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.temp = torch.nn.Parameter(torch.tensor(0.07))
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 5, 4))
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
            self.norm = torch.nn.LayerNorm(4)
            self.proj = torch.nn.Linear(4, 4)
            self.proj_m = torch.nn.Linear(4, 4)
            self.proj_m.requires_grad_(False)

    model = Toy()
    optimizer = create_optimizer({'opt': 'adamW', 'lr': 1e-4, 'weight_decay': 0.02}, model)
    no_decay, decay = optimizer.param_groups
    ids = lambda group: {id(p) for p in group['params']}
    assert no_decay['weight_decay'] == 0 and decay['weight_decay'] == 0.02
    assert ids(no_decay) == {id(model.norm.weight), id(model.norm.bias), id(model.proj.bias)}
    assert ids(decay) == {id(model.temp), id(model.pos_embed), id(model.cls_token), id(model.proj.weight)}
    assert (optimizer.defaults['betas'], optimizer.defaults['eps']) == ((0.9, 0.999), 1e-8)
    with pytest.raises(ValueError, match="only 'adamW'"):
        create_optimizer({'opt': 'sgd', 'lr': 1e-4, 'weight_decay': 0.02}, model)
