"""Freezing a tower (models/freeze.py; config keys and flags freeze_vision / freeze_text) and
grad_clip_norm, through the engine's own path: engine.prepare builds the optimizer and loads or
resumes, engine.fit runs Pretrain.py's train_step on a tiny model."""
import argparse
import copy

import pytest
import torch

import engine
import Pretrain
from configuration import COMMON_KEYS, ConfigError
from dataset import Batch
from engine.options import effective_config, get_args_parser
from models.freeze import freeze_towers, parameter_counts
from scheduler import create_scheduler

OPTIMIZER = {'opt': 'adamW', 'lr': 1e-3, 'weight_decay': 0.02}
SCHEDULE = {'sched': 'cosine', 'lr': 1e-3, 'epochs': 1, 'min_lr': 1e-5, 'decay_rate': 1, 'warmup_lr': 1e-3,
            'warmup_epochs': 1, 'cooldown_epochs': 0}


def frozen_names(model):
    return {n for n, p in model.named_parameters() if not p.requires_grad and '_m.' not in n}


def test_each_setting_freezes_its_blocks(make_model):
    # the tiny model: ViT of 2 blocks; BERT of 4 layers fused from layer 2 (text layers 0-1)
    model = make_model('pretrain')
    vit_stem = {'visual_encoder.cls_token', 'visual_encoder.pos_embed', 'visual_encoder.patch_embed.proj.weight',
                'visual_encoder.patch_embed.proj.bias'}
    block0 = {n for n, _ in model.named_parameters() if n.startswith('visual_encoder.blocks.0.')}
    embeddings = {n for n, _ in model.named_parameters() if n.startswith('text_encoder.bert.embeddings.')}
    layers = [{n for n, _ in model.named_parameters() if n.startswith(f'text_encoder.bert.encoder.layer.{i}.')}
              for i in range(4)]
    assert freeze_towers(model, vision=1) == "the image encoder's patch embedding and block 0"
    assert frozen_names(model) == vit_stem | block0
    model = make_model('pretrain')
    assert freeze_towers(model, text=1) == "the text encoder's embeddings and layer 0"
    assert frozen_names(model) == embeddings | layers[0]
    # the MLM decoder shares the word embeddings' weight: frozen with them
    assert not model.text_encoder.cls.predictions.decoder.weight.requires_grad
    model = make_model('pretrain')
    assert freeze_towers(model, vision=True, text=True) == 'the image encoder and the text encoder'
    assert frozen_names(model) == {n for n, _ in model.named_parameters() if n.startswith('visual_encoder.')} \
        | embeddings | layers[0] | layers[1]   # the fusion layers 2-3 keep training
    assert freeze_towers(make_model('pretrain'), vision=0, text=False) == ''
    trained, total = parameter_counts(model)
    assert total == sum(p.numel() for n, p in model.named_parameters() if '_m.' not in n)
    assert trained == total - sum(p.numel() for n, p in model.named_parameters() if n in frozen_names(model))
    with pytest.raises(ValueError, match=r'^freeze_vision: expected true, false or a number of ViT blocks from 0 '
                                         r'to 2 \(this model has 2\), got 3$'):
        freeze_towers(make_model('pretrain'), vision=3)
    with pytest.raises(ValueError, match=r'^freeze_text: expected .* from 0 to 2 \(this model has 2\), got 3$'):
        freeze_towers(make_model('pretrain'), text=3)


@pytest.mark.parametrize('variant', ['retrieval', 'vqa', 've', 'nlvr', 'pretrain_nlvr'])
def test_every_fine_tuning_model_freezes_the_same_way(make_model, variant):
    model = make_model(variant)
    freeze_towers(model, vision=True, text=True)
    names = frozen_names(model)
    assert names and all(n.startswith(('visual_encoder.', 'text_encoder.embeddings.', 'text_encoder.encoder.layer.0.',
                                       'text_encoder.encoder.layer.1.')) for n in names)
    assert all(n in names for n, _ in model.named_parameters() if n.startswith('visual_encoder.'))


# ---- through the engine ---------------------------------------------------------------------------
class Batches:
    """A training loader of `steps` batches of 4 random 32-px images and captions (and its sampler)."""

    def __init__(self, tokenizer, steps, seed=0):
        generator = torch.Generator().manual_seed(seed)
        captions = ['a red circle', 'two blue squares on the left', 'a green triangle', 'a small yellow star']
        self.batches = [Batch(image=torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator),
                              text=tokenizer(captions, padding='longest', return_tensors='pt')) for _ in range(steps)]
        self.batch_size, self.sampler = 4, self

    def set_epoch(self, epoch, start=0):
        pass

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def make_run(tmp_path, resume=False, epochs=1, **keys):
    config = {'optimizer': dict(OPTIMIZER), 'schedular': {**SCHEDULE, 'epochs': epochs}, 'print_freq': 10 ** 6,
              'alpha': 0.4, **keys}
    return engine.Run(args=argparse.Namespace(seed=0, resume=resume, checkpoint='', config='Pretrain.yaml'),
                      config=config, output_dir=str(tmp_path), scaler=torch.amp.GradScaler('cpu', enabled=False))


def test_frozen_parameters_stay_bit_unchanged_and_resume_keeps_them(make_model, tokenizer, tmp_path, capsys):
    model = make_model('pretrain')
    before = copy.deepcopy(model.state_dict())
    run = make_run(tmp_path, freeze_vision=1, freeze_text=True)
    training = engine.prepare(run, model)
    frozen = frozen_names(model)
    trained, total = parameter_counts(model)
    assert f'trained parameters: {trained:,} of {total:,} (the image encoder\'s patch embedding and block 0 and ' \
           f'the text encoder frozen)\n' in capsys.readouterr().out
    # the optimizer holds exactly the trainable parameters, in the original's two groups
    held = [p for group in training.optimizer.param_groups for p in group['params']]
    assert len(training.optimizer.param_groups) == 2
    assert {id(p) for p in held} == {id(p) for p in model.parameters() if p.requires_grad}
    engine.fit(run, training, Batches(tokenizer, 2), Pretrain.train_step)

    after = model.state_dict()
    online = [n for n, _ in model.named_parameters() if '_m.' not in n]
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert all(not torch.equal(after[n], before[n]) for n in online if n not in frozen)
    # a frozen parameter's momentum copy is equal to it; a trained one's lags behind
    momentum = {n: n.replace('visual_encoder.', 'visual_encoder_m.').replace('text_encoder.', 'text_encoder_m.')
                for n in online if n.startswith(('visual_encoder.', 'text_encoder.'))}
    assert all(torch.equal(after[momentum[n]], after[n]) for n in frozen)
    assert not any(torch.equal(after[m], after[n]) for n, m in momentum.items() if n not in frozen)

    # --resume with another setting: one line, nothing loaded
    with pytest.raises(ConfigError) as error:
        engine.prepare(make_run(tmp_path, resume=True, epochs=2, freeze_vision=True, freeze_text=True),
                       make_model('pretrain'))
    assert str(error.value) == (f'--resume: {tmp_path}/checkpoint_00.pth was trained with freeze_vision: 1, '
                                f'freeze_text: true, this run has freeze_vision: true, freeze_text: true; resume '
                                f'with the same setting (its optimizer state holds only the parameters trained then)')
    # the same setting: the same parameters stay frozen through another epoch
    resumed_model = make_model('pretrain', seed=1)
    run = make_run(tmp_path, resume=True, epochs=2, freeze_vision=1, freeze_text=True)
    training = engine.prepare(run, resumed_model)
    assert frozen_names(resumed_model) == frozen
    engine.fit(run, training, Batches(tokenizer, 1, seed=1), Pretrain.train_step)
    resumed = resumed_model.state_dict()
    assert all(torch.equal(resumed[n], before[n]) for n in frozen)
    assert not any(torch.equal(resumed[n], after[n]) for n in online if n not in frozen)


def test_flags_and_keys(tmp_path):
    assert {'freeze_vision', 'freeze_text', 'grad_clip_norm'} <= COMMON_KEYS.keys()
    parser = argparse.ArgumentParser(parents=[get_args_parser('c.yaml', str(tmp_path))])
    cpu = torch.device('cpu')

    def resolve(argv, **keys):
        return effective_config(parser.parse_args(argv), keys, cpu)[0]

    config = resolve(['--freeze_vision', '--freeze_text', '3', '--grad_clip_norm', '1'], freeze_vision=False)
    assert (config['freeze_vision'], config['freeze_text'], config['grad_clip_norm']) == (True, 3, 1.0)
    config = resolve(['--freeze_vision', '0'], freeze_vision=True, freeze_text=2)
    assert (config['freeze_vision'], config['freeze_text'], config.get('grad_clip_norm')) == (0, 2, None)
    with pytest.raises(ConfigError, match=r"^c\.yaml: freeze_text: expected true, false or a number of lower "
                                          r"blocks \(0 or more\), got 'yes'$"):
        resolve([], freeze_text='yes')
    with pytest.raises(ConfigError, match=r'^--freeze_vision: expected .*, got -1$'):
        resolve(['--freeze_vision', '-1'])
    with pytest.raises(ConfigError, match=r'^c\.yaml: grad_clip_norm: expected a positive number \(the largest '
                                          r'total gradient norm\), got 0$'):
        resolve([], grad_clip_norm=0)


def test_a_setting_the_model_cannot_have_is_one_line(demo_config, tmp_path, capsys):
    """Pretrain.py in-process on the demo world (depth-4 ViT): exit status 2, one line, nothing written."""
    config = demo_config('Pretrain', batch_size=8, queue_size=32, num_workers=0, freeze_vision=5)
    for argv, message in (([], 'freeze_vision: expected true, false or a number of ViT blocks from 0 to 4 (this '
                                'model has 4), got 5'),
                          (['--freeze_text', '-2'], '--freeze_text: expected true, false or a number of lower blocks '
                                                    '(0 or more), got -2')):
        with pytest.raises(SystemExit) as exit_info:
            engine.launch(Pretrain.main, Pretrain.get_parser(), ['--config', config, '--output_dir',
                                                                 str(tmp_path / 'out'), '--device', 'cpu', *argv])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f'error: {message}\n'
        assert not (tmp_path / 'out').exists()


# ---- grad_clip_norm -------------------------------------------------------------------------------
@pytest.mark.parametrize('fp16', [False, True])
def test_grad_clip_norm_clips_the_true_gradient(tmp_path, fp16):
    """The gradient of a known loss, (3, 4) on the weight and 12 on the bias: total norm 13. The
    optimizer's step sees it whole without grad_clip_norm and scaled to norm 6.5 with 6.5; under a
    fp16 GradScaler (loss scaled by 2^16) the clipping acts on the unscaled gradient all the same."""
    seen = {}
    for clip in (None, 6.5):
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step's gradients are what is checked
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.__setitem__(
            clip, (model.weight.grad.tolist(), model.bias.grad.tolist())))
        run = make_run(tmp_path / str(clip), grad_clip_norm=clip)
        run.scaler = torch.amp.GradScaler('cpu', enabled=fp16)
        scheduler, _ = create_scheduler(run.config['schedular'], optimizer)
        training = engine.Training(model, model, optimizer, scheduler, None, engine.build.TrainState())

        def train_step(model, batch, alpha, run):
            return {'loss': (model.weight * torch.tensor([[3., 4.]])).sum() + 12 * model.bias.sum()}

        engine.train_one_epoch(model, OneBatch(), optimizer, scheduler, 0, run, training.state,
                               lambda m, b, a, **step: train_step(m, b, a, run))
    assert seen[None] == ([[3.0, 4.0]], [12.0])
    weight, bias = seen[6.5]
    assert weight[0] == pytest.approx([1.5, 2.0], rel=1e-5) and bias == pytest.approx([6.0], rel=1e-5)


class OneBatch:
    batch_size = 1
    sampler = property(lambda self: self)

    def set_epoch(self, epoch, start=0):
        pass

    def __len__(self):
        return 1

    def __iter__(self):
        return iter([None])
