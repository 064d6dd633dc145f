"""No training step reads a tensor value back to the host (after the first step).

On a GPU every such read (`.item()`, `int(t)`, `nonzero`, boolean-mask indexing, an output whose
shape depends on the values, a multinomial's validity checks) makes the host wait until the GPU has
finished all the work queued before it, so the host can no longer run ahead and the GPU idles
between kernels. A CPU has no such wait, but the same operations show up in the dispatcher: a
TorchDispatchMode records each of them, with the line of our code that asked for it, during steps
2 and 3 of four-step runs of `engine.train_one_epoch` with each script's own `train_step`.

Host-to-device copies cannot be seen on a CPU (moving a CPU tensor to the CPU dispatches nothing);
benchmarks/gpu_check.sh checks the same steps on CUDA with torch.cuda.set_sync_debug_mode('error').
"""
import argparse
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine
from benchmarks.sync_check import Batches
from dataset.collate import NLVRCollate, RetrievalCollate, VQACollate
from engine.checkpointing import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
aten = torch.ops.aten

# Operators that read tensor values on the host, whatever their arguments.
READS_VALUES = {
    aten._local_scalar_dense: '.item() / int() / float() / bool() of a tensor',
    aten.nonzero: 'nonzero (its output shape depends on the values)',
    aten.masked_select: 'masked_select (data-dependent shape)',
    aten._unique2: 'unique (data-dependent shape)',
    aten.unique_dim: 'unique (data-dependent shape)',
    aten.unique_consecutive: 'unique_consecutive (data-dependent shape)',
    aten.bincount: 'bincount (reads the maximum to size its output)',
    aten.equal: 'torch.equal (returns a Python bool)',
    aten.is_nonzero: 'truth value of a tensor',
    aten.multinomial: 'multinomial (its CUDA kernel checks the probabilities with two .item() calls)',
}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

# Where a read-back is allowed: (file, function), each with the reason. Nothing else may read.
ALLOWED = {
    # The loss guard and the meters are read only on the steps that print a log line (every
    # print_freq steps), where the line needs the values anyway.
    ('engine/loop.py', 'LossGuard.check'): 'the non-finite-loss check, every print_freq steps',
    # (log_every is on the stack only while it runs its own code, the printing, not the loop body)
    ('utils.py', 'MetricLogger.log_every'): 'the meters, read when a log line is printed',
    # Host-side work on the CPU copy of the tokenizer output (never on the device): the masked
    # positions of the MLM head, and the token packing, which xbert uses only when the attention
    # mask is a CPU tensor (training on a CPU), never on a GPU.
    ('models/model_pretrain.py', 'masked_positions'): 'MLM positions, from the CPU copy of the text',
    ('models/xbert.py', 'Packing.__init__'): 'token packing, from the CPU copy of the mask (the loader\'s)',
}


def _where(stack_depth=2):
    """The frames of our code, innermost first: (file relative to the repository, qualified
    function, line) each."""
    frames, frame = [], sys._getframe(stack_depth)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        rel = os.path.relpath(path, ROOT)
        if not rel.startswith(('..', 'tests' + os.sep)) and '.venv' not in rel and 'site-packages' not in path:
            frames.append((rel, frame.f_code.co_qualname, frame.f_lineno))
        frame = frame.f_back
    return frames or [('?', '?', 0)]


def _reason(func, args, kwargs):
    packet = func.overloadpacket
    if packet in READS_VALUES:
        return READS_VALUES[packet]
    if packet in INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get('indices', ())
        if any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return 'boolean-mask indexing (nonzero inside)'
    if packet is aten.repeat_interleave and func is not aten.repeat_interleave.self_int:
        if kwargs.get('output_size') is None and not (len(args) > 3 and args[3] is not None):
            return 'repeat_interleave without output_size (sums the repeats on the host)'
    if packet is aten._to_copy:
        device = kwargs.get('device')
        if device is not None and torch.device(device).type == 'cpu' and args[0].device.type != 'cpu':
            return 'device-to-host copy'
    if packet is aten.copy_ and args[0].device.type == 'cpu' and args[1].device.type != 'cpu':
        return 'device-to-host copy'
    return None


class HostReads(TorchDispatchMode):
    """Records every operator that reads tensor values back to the host, with where it came from."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _reason(func, args, kwargs)
        if reason is not None:
            frames = _where()
            self.reads.append((*frames[0], str(func), reason, frames))
        return func(*args, **kwargs)

    def forbidden(self):
        return [r for r in self.reads if not any((file, function) in ALLOWED for file, function, _ in r[5])]


class NoScheduler:
    def step_iteration(self, *args):
        pass


def run_steps(model, tokenizer, batches, train_step, config_extra=None):
    config = {'alpha': 0.4, 'print_freq': 2, 'num_workers': 0, 'schedular': {'warmup_epochs': 0},
              'optimizer': {'opt': 'adamW', 'lr': 1e-4, 'weight_decay': 0.02}, **(config_extra or {})}
    run = engine.Run(args=argparse.Namespace(seed=0), config=config, tokenizer=tokenizer,
                     scaler=torch.amp.GradScaler('cpu', enabled=False))
    from optim import create_optimizer
    optimizer = create_optimizer(config['optimizer'], model)  # fused AdamW, as the scripts build it
    recorder = HostReads()
    engine.train_one_epoch(model, Batches(batches, recorder.__enter__, lambda: recorder.__exit__(None, None, None)), optimizer, NoScheduler(), 1, run,
                           TrainState(), lambda m, b, a, **step: train_step(m, b, a, run, **step))
    return recorder


def assert_no_host_reads(recorder):
    forbidden = recorder.forbidden()
    assert not forbidden, 'host reads in steps 2-3:\n' + '\n'.join(
        f'  {file}:{line} in {function}: {op}: {reason}' for file, function, line, op, reason, _ in forbidden)
    # the allow-list is exercised: step 3 prints a log line (print_freq 2) and reads the meters
    assert any(f[1] == 'LossGuard.check' for r in recorder.reads for f in r[5])


CAPTIONS = ['a red circle on the left', 'two blue squares', 'the small green triangle at the top',
            'there is a yellow circle', 'a large red square at the bottom right', 'one shape']


def images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def captions(step):
    return [CAPTIONS[(step + i) % len(CAPTIONS)] for i in range(4)]


def uint8_images(n, seed):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_pretraining_steps_read_nothing_back(make_model, tokenizer):
    import Pretrain
    from dataset import MaskedCaptionCollate
    # as the loader delivers them: uint8 images, captions tokenised and masked by the workers' collate
    model = make_model('pretrain')
    collate = MaskedCaptionCollate(tokenizer, 0.15, model.text_encoder.config.vocab_size)
    batches = [collate(list(zip(uint8_images(4, s), captions(s)))) for s in range(4)]
    assert_no_host_reads(run_steps(model, tokenizer, batches, Pretrain.train_step))


def test_retrieval_steps_read_nothing_back(make_model, tokenizer):
    import Retrieval
    collate = RetrievalCollate(tokenizer)
    batches = [collate(list(zip(images(4, s), captions(s), [s, s, s + 1, s + 2]))) for s in range(4)]
    assert_no_host_reads(run_steps(make_model('retrieval'), tokenizer, batches, Retrieval.train_step))


def test_vqa_steps_read_nothing_back(make_model, tokenizer):
    import VQA
    questions = ['what color is the circle?', 'how many squares are there?', 'is there a triangle?',
                 'where is the square?']
    answers = [['red'], ['blue', 'two'], ['yes'], ['left', 'right']]
    weights = [[1.], [.5, .5], [1.], [.7, .3]]
    collate = VQACollate(tokenizer)
    batches = [collate(list(zip(images(4, s), questions, answers, weights))) for s in range(4)]
    assert_no_host_reads(run_steps(make_model('vqa'), tokenizer, batches, VQA.train_step))


def test_nlvr_steps_read_nothing_back(make_model, tokenizer):
    import NLVR
    collate = NLVRCollate(tokenizer)
    batches = [collate(list(zip(images(4, s), images(4, s + 10), captions(s), [0, 1, 1, 0]))) for s in range(4)]
    assert_no_host_reads(run_steps(make_model('nlvr'), tokenizer, batches, NLVR.train_step))


def test_the_recorder_sees_what_syncs_a_gpu():
    """The recorder itself: each kind of read is caught, ordinary work is not."""
    x = torch.randn(6, 4)
    with HostReads() as recorder:
        (x.sum() * 2).exp()
        x.index_select(0, torch.tensor([0, 2]))
        torch.repeat_interleave(x, torch.tensor([1, 2, 0, 1, 1, 1]), dim=0, output_size=6)
    assert recorder.reads == []
    with HostReads() as recorder:
        float(x.sum())
        x[x > 0]
        (x > 0).nonzero()
        torch.repeat_interleave(x, torch.tensor([1, 2, 0, 1, 1, 1]), dim=0)
        torch.multinomial(x.abs(), 1)
    reasons = [r[4] for r in recorder.reads]
    assert reasons[0] == READS_VALUES[aten._local_scalar_dense]
    assert 'boolean-mask indexing (nonzero inside)' in reasons and READS_VALUES[aten.nonzero] in reasons
    assert any(r.startswith('repeat_interleave') for r in reasons) and READS_VALUES[aten.multinomial] in reasons
