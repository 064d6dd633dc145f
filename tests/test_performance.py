"""Speed and memory options keep the numbers: the default path equals the plain (original-style)
path, bf16 stays close to fp32, gradient checkpointing gives the same gradients and never ties the
momentum encoders to the online ones, and accumulation moves the momentum once per optimizer step."""
import argparse
import importlib.util
import json
import os

import pytest
import torch

import engine
import engine.build
import engine.options
from conftest import assert_same_state, assert_same_steps
from engine.checkpointing import TrainState
from models.losses import sample_negatives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    spec = importlib.util.spec_from_file_location('train_step_benchmark',
                                                  os.path.join(ROOT, 'benchmarks', 'train_step.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def bench():
    return load_benchmark()


def tiny_batch(tokenizer, batch_size=8, res=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, 3, res, res, generator=g)
    words = ['a red circle on the left', 'two blue squares', 'the small green triangle at the top',
             'there is a yellow circle', 'a large red square at the bottom right', 'one shape']
    captions = [words[i % len(words)] for i in range(batch_size)]
    return image, captions


def losses_and_grads(model, image, text, seed, context=None):
    torch.manual_seed(seed)
    with context or torch.autocast('cpu', enabled=False):
        losses = model(image, text, alpha=0.4)
    sum(losses).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return [l.detach() for l in losses], grads


def test_batched_negative_sampling_draws_what_the_row_loop_draws():
    weights = torch.rand(12, 12).fill_diagonal_(0)
    torch.manual_seed(3)
    rows = torch.cat([torch.multinomial(w, 1) for w in weights])
    torch.manual_seed(3)
    assert torch.equal(sample_negatives(weights), rows)


def no_dropout(config):
    with open(config['bert_config']) as f:
        bert = json.load(f)
    bert.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {**config, 'bert_config': bert}


def test_default_path_equals_the_plain_path(bench, make_model, tokenizer, tiny_config):
    """Training forwards without dropout (with it, the two paths draw their masks in a different
    order): losses, gradients, momentum weights and queues agree."""
    config = no_dropout(tiny_config)
    model = make_model('pretrain', bert_config=config['bert_config'])
    plain = bench.PlainALBEF(config=config, text_encoder=None, tokenizer=tokenizer, init_deit=False)
    plain.load_state_dict(model.state_dict())
    image, captions = tiny_batch(tokenizer)
    for step in range(2):  # the second step reads the queues the first wrote
        text = tokenizer(captions, padding='longest', return_tensors='pt')
        ours, our_grads = losses_and_grads(model, image, text, seed=step)
        text = tokenizer(captions, padding='longest', return_tensors='pt')
        with bench.plain_path():
            theirs, their_grads = losses_and_grads(plain, image, text, seed=step)
        assert_same_steps(ours, our_grads, theirs, their_grads, grad_atol=1e-5)
    assert_same_state(model, plain)  # momentum weights and queues too


def test_explicit_attention_of_the_plain_path_equals_sdpa(bench):
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    mask = torch.randn(2, 1, 1, 7)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(bench.explicit_attention(q, k, v, attn_mask=mask), expected)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(bench.explicit_attention(q, k, v, is_causal=True, scale=0.3), expected)


def test_bf16_losses_stay_within_one_percent_of_fp32(make_model, tokenizer):
    model = make_model('pretrain').eval()  # no dropout: the two runs see the same network
    image, captions = tiny_batch(tokenizer, batch_size=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fp32, _ = losses_and_grads(model, image, tokenizer(captions, padding='longest', return_tensors='pt'), seed=0)
    model.load_state_dict(state)
    bf16, _ = losses_and_grads(model, image, tokenizer(captions, padding='longest', return_tensors='pt'), seed=0,
                               context=torch.autocast('cpu', dtype=torch.bfloat16))
    for name, a, b in zip(('mlm', 'ita', 'itm'), fp32, bf16):
        assert b.dtype == torch.float32, name
        assert abs(float(b) - float(a)) <= 1e-2 * abs(float(a)), (name, float(a), float(b))
    # the queues stay float32 under autocast
    assert model.image_queue.dtype == model.text_queue.dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_gradients(make_model, tokenizer):
    plain, checkpointed = make_model('pretrain'), make_model('pretrain')
    checkpointed.set_grad_checkpointing(True)
    image, captions = tiny_batch(tokenizer)
    text = tokenizer(captions, padding='longest', return_tensors='pt')
    ours, our_grads = losses_and_grads(checkpointed, image, text, seed=1)
    theirs, their_grads = losses_and_grads(plain, image, text, seed=1)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert our_grads.keys() == their_grads.keys()
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_never_ties_the_momentum_encoders_to_the_online_ones(make_model, tokenizer):
    model = make_model('pretrain')
    model.set_grad_checkpointing(True)
    assert model.visual_encoder.grad_checkpointing and model.text_encoder.bert.encoder.gradient_checkpointing
    assert not model.visual_encoder_m.grad_checkpointing
    assert not model.text_encoder_m.bert.encoder.gradient_checkpointing
    online_ptrs = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    momentum = [p for name, p in model.named_parameters() if name.split('.')[0].endswith('_m')]
    assert momentum and not any(p.data_ptr() in online_ptrs for p in momentum)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    image, captions = tiny_batch(tokenizer)
    for _ in range(2):
        before_online = [p.detach().clone() for m, _ in model.model_pairs for p in m.parameters()]
        before_momentum = [p.detach().clone() for _, m in model.model_pairs for p in m.parameters()]
        loss = sum(model(image, tokenizer(captions, padding='longest', return_tensors='pt'), alpha=0.4))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after_momentum = [p.detach() for _, m in model.model_pairs for p in m.parameters()]
        after_online = [p.detach() for m, _ in model.model_pairs for p in m.parameters()]
        for old_m, old, new_m, new in zip(before_momentum, before_online, after_momentum, after_online):
            # theta_m <- m theta_m + (1 - m) theta, with the online weights of before the step
            torch.testing.assert_close(new_m, old_m * model.momentum + old * (1 - model.momentum))
        assert any(not torch.equal(a, b) for a, b in zip(after_online, after_momentum))


def test_accumulation_moves_momentum_and_optimizer_once_per_step(make_model, tokenizer, tiny_config, tmp_path):
    model = make_model('pretrain')
    updates = []
    original = model._momentum_update

    def counted():
        updates.append(1)
        original()
    model._momentum_update = counted
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps = []
    optimizer.register_step_post_hook(lambda *a: steps.append(1))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return torch.randn(3, 32, 32), f'a red circle number {i}'

    config = {'alpha': 0.4, 'print_freq': 100, 'num_workers': 0, 'accum_steps': 2,
              'schedular': {'warmup_epochs': 0}}
    args = argparse.Namespace(seed=0)
    run = engine.Run(args=args, config=config, accum_steps=2, scaler=torch.amp.GradScaler('cpu', enabled=False),
                     output_dir=str(tmp_path))
    loader = engine.train_loader(run, Data(), 4)  # 5 batches: steps of 2, 2 and 1

    def train_step(m, batch, alpha, update_momentum):
        image, caption = batch
        text = tokenizer(list(caption), padding='longest', return_tensors='pt')
        loss_mlm, loss_ita, loss_itm = m(image, text, alpha=alpha, update_momentum=update_momentum)
        return {'loss_mlm': loss_mlm, 'loss_ita': loss_ita, 'loss_itm': loss_itm}

    class NoScheduler:
        def step_iteration(self, *a):
            pass
    engine.train_one_epoch(model, loader, optimizer, NoScheduler(), 1, run, TrainState(), train_step)
    assert len(steps) == 3 and len(updates) == 3


def test_compile_falls_back_to_eager_mode(capsys):
    from torch._inductor.exc import InvalidCxxCompiler

    def broken(*args, **kwargs):
        raise InvalidCxxCompiler()
    model = torch.nn.Linear(3, 2)
    wrapped = engine.build.CompileFallback(broken, model)
    x = torch.randn(4, 3)
    assert torch.equal(wrapped(x), model(x)) and torch.equal(wrapped(x), model(x))
    out = capsys.readouterr().out
    assert out.count('torch.compile failed') == 1 and 'InvalidCxxCompiler: No working C++ compiler' in out
    assert wrapped.weight is model.weight  # attributes come from the eager model


def test_compile_fallback_lets_other_errors_through(capsys):
    def broken(*args, **kwargs):
        raise RuntimeError('CUDA out of memory')
    wrapped = engine.build.CompileFallback(broken, torch.nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match='CUDA out of memory'):
        wrapped(torch.randn(4, 3))
    assert not wrapped.failed and capsys.readouterr().out == ''


@pytest.mark.parametrize('key,value,message', [
    ('amp', 'fp8', "amp: expected one of bf16, fp16, off, got 'fp8'"),
    ('accum_steps', 0, 'accum_steps: expected a positive integer, got 0'),
    ('accum_steps', 1.5, 'accum_steps: expected a positive integer, got 1.5'),
])
def test_bad_speed_options_are_refused(key, value, message):
    with pytest.raises(engine.ConfigError) as error:
        engine.options.speed_options(argparse.Namespace(), {key: value}, torch.device('cpu'))
    assert str(error.value) == message


def test_speed_option_defaults_and_flags():
    config = {'amp': False}  # YAML `amp: off`
    engine.options.speed_options(argparse.Namespace(amp=None, accum_steps=None), config, torch.device('cpu'))
    assert config == {'amp': 'off', 'accum_steps': 1, 'grad_checkpointing': False, 'compile': False}
    config = {'amp': 'off', 'accum_steps': 4}
    engine.options.speed_options(argparse.Namespace(amp='bf16', accum_steps=2, grad_checkpointing=True), config,
                         torch.device('cpu'))
    assert config['amp'] == 'bf16' and config['accum_steps'] == 2 and config['grad_checkpointing'] is True


class _OpenCVThreads(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        import cv2
        return cv2.getNumThreads()


def test_loader_workers_fill_the_cores_with_one_opencv_thread_each(monkeypatch):
    """num_workers defaults to this process's share of the node's cores, uncapped; each loader
    worker runs OpenCV (RandomAugment) on one thread."""
    from dataset import loaders
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(64)))
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    assert loaders.default_num_workers() == 32
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '128')
    assert loaders.default_num_workers() == 1
    # the worker init every loader uses (timeout: OpenCV's own thread pool can hang after fork)
    loader = torch.utils.data.DataLoader(_OpenCVThreads(), batch_size=2, num_workers=1, timeout=60,
                                         worker_init_fn=loaders._worker_init)
    assert next(iter(loader)).tolist() == [1, 1]
