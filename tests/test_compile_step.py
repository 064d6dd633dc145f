"""--compile step on the CPU: the whole pre-training model (forward and backward) and the optimizer
step (gradient clipping, AdamW with a tensor lr) compiled with the cheap aot_eager backend (inductor
takes minutes on a CPU), trained by engine.train_one_epoch against the same steps in eager mode. The comparison compiles the
tiny model's forward, backward and optimizer step: about 30-40 s of CPU time (85-125 s of wall time
measured on a busy shared 2-core machine), most of it tracing; the other tests take seconds."""
import argparse

import pytest
import torch

import engine
import engine.build
import engine.options
from engine.checkpointing import TrainState
from scheduler import create_scheduler

SCHEDULE = {'sched': 'cosine', 'lr': 1e-3, 'epochs': 2, 'min_lr': 1e-5, 'decay_rate': 1, 'warmup_lr': 1e-5,
            'warmup_epochs': 5, 'cooldown_epochs': 0}


class Captions(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        image = torch.linspace(-1, 1, 3 * 32 * 32).view(3, 32, 32) * (i % 5 + 1)
        return image, ['a red circle on the left', 'two blue squares', 'the small green triangle'][i % 3] + f' {i}'


def _train(make_model, tokenizer, tmp_path, compiled):
    """The losses of three steps (batches of 4) and the number of graphs after each step."""
    from torch._dynamo.utils import counters
    model = make_model('pretrain')
    for module in model.modules():  # compiled graphs draw dropout's random numbers otherwise than eager mode
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = {'alpha': 0.4, 'print_freq': 100, 'num_workers': 0, 'grad_clip_norm': 0.5,
              'compile': 'step' if compiled else False, 'schedular': SCHEDULE}
    run = engine.Run(args=argparse.Namespace(seed=0), config=config, output_dir=str(tmp_path),
                     scaler=torch.amp.GradScaler('cpu', enabled=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    lr_scheduler, _ = create_scheduler(SCHEDULE, optimizer)
    step_model, fallback = model, None
    if compiled:  # as engine.build.wrap_model / prepare do, with the test's backend
        step_model = fallback = engine.build.CompileFallback(
            engine.build.compile_model(model, model, backend='aot_eager'), model)
    optimizer_step = engine.build.make_optimizer_step(optimizer, run, backend='aot_eager')
    losses, graphs = [], []

    def train_step(m, batch, alpha, update_momentum=True):
        image, caption = batch
        text = tokenizer(list(caption), padding='max_length', truncation=True, max_length=12, return_tensors='pt')
        out = dict(zip(('loss_mlm', 'loss_ita', 'loss_itm'), m(image, text, alpha=alpha,
                                                                update_momentum=update_momentum)))
        losses.append([float(v.detach()) for v in out.values()])
        return out

    class EveryStep:  # the schedule moves at every step, so each step runs at another lr
        def step_iteration(self, epoch, i):
            lr_scheduler.step(i + 1)
            graphs.append(counters['stats']['unique_graphs'])

    torch.manual_seed(0)
    engine.train_one_epoch(step_model, engine.train_loader(run, Captions(), 4), optimizer, EveryStep(), 0, run,
                           TrainState(), train_step, optimizer_step=optimizer_step)
    assert fallback is None or not fallback.failed
    return losses, graphs, [group['lr'] for group in optimizer.param_groups]


def test_the_compiled_step_gives_the_eager_losses_and_compiles_once(make_model, tokenizer, tmp_path):
    torch._dynamo.reset()
    try:
        eager, no_graphs, eager_lr = _train(make_model, tokenizer, tmp_path / 'eager', compiled=False)
        compiled, graphs, compiled_lr = _train(make_model, tokenizer, tmp_path / 'compiled', compiled=True)
    finally:
        torch._dynamo.reset()
    assert len(eager) == len(compiled) == 3 and no_graphs == [0, 0, 0]
    # the lr is a 0-d tensor, filled in place by the schedule, at the eager run's values
    assert all(isinstance(lr, torch.Tensor) and lr.ndim == 0 for lr in compiled_lr)
    torch.testing.assert_close([float(lr) for lr in compiled_lr], eager_lr)
    # the forward / backward graphs and the optimizer's, all made in the first step; none after it
    assert graphs[0] >= 2 and graphs == [graphs[0]] * 3, graphs
    # steps 2 and 3 train the weights that the compiled optimizer step wrote
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_compile_modes_from_the_flag_and_the_config():
    parser = engine.options.get_args_parser('c.yaml', 'out')
    assert parser.parse_args(['--compile']).compile == 'layers'
    assert parser.parse_args(['--compile', 'step']).compile == 'step'
    assert parser.parse_args(['--no-compile']).compile is False
    assert parser.parse_args([]).compile is None
    for given, mode in ((True, 'layers'), ('step', 'step'), (None, False), (False, False)):
        config = {'amp': 'off', 'compile': given}
        engine.options.speed_options(argparse.Namespace(), config, torch.device('cpu'))
        assert config['compile'] == mode
    config = {'amp': 'off', 'compile': 'layers'}  # the flag over the config key
    engine.options.speed_options(argparse.Namespace(compile='step'), config, torch.device('cpu'))
    assert config['compile'] == 'step'


@pytest.mark.parametrize('config,message', [
    ({'amp': 'fp16', 'compile': 'step'}, 'compile step: --amp fp16 is not supported'),
    ({'amp': 'off', 'compile': 'graph'}, r"compile: expected true \(= layers\), false, layers or step, got 'graph'"),
])
def test_compile_settings_that_cannot_work_are_refused(config, message):
    with pytest.raises(engine.ConfigError, match=message):
        engine.options.speed_options(argparse.Namespace(), config, torch.device('cpu'))


def test_a_compiler_error_turns_every_compiled_layer_back_to_eager(make_model, capsys):
    """The fallback of regional compilation: after the compiler's first error every region runs
    eagerly (torch's public 'force_eager' stance), not only the one the fallback called."""
    model = make_model('retrieval').eval()
    blocks = model.visual_encoder.blocks
    x = torch.randn(2, 17, 48)
    expected = [block(x) for block in blocks]

    def no_compiler(graph, inputs):
        raise RuntimeError('no working C++ compiler')
    torch._dynamo.reset()
    try:
        regions = engine.build.compile_regions(model, backend=no_compiler)
        first = engine.build.CompileFallback(blocks[0], blocks[0], regions)
        out = [first(x), blocks[1](x)]  # the second block is called directly: it must not compile either
    finally:
        torch.compiler.set_stance('default')
        torch._dynamo.reset()
    torch.testing.assert_close(out, expected)
    assert first.failed and capsys.readouterr().out.count('torch.compile failed (BackendCompilerFailed') == 1
