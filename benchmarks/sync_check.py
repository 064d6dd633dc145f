"""Check on CUDA that pre-training steps 2 and 3 never make the host wait for the GPU.

    python benchmarks/sync_check.py --size base --amp bf16

Runs four steps of `engine.train_one_epoch` with Pretrain.py's own train_step on the benchmark's
synthetic batches, with torch.cuda.set_sync_debug_mode('error') around steps 2 and 3: any
synchronising call there (a value read back, a blocking copy, a multinomial's checks) raises.
The CPU counterpart, for every script, is tests/test_no_sync.py. Prints one JSON line.
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
if __name__ == '__main__' and not torch.cuda.is_available():  # before the slower imports
    print(json.dumps({'sync_check': 'skipped: no CUDA device'}))
    sys.exit(0)
import engine  # noqa: E402
from models.checkpoint import TrainState  # noqa: E402
import Pretrain  # noqa: E402
import train_step as bench  # noqa: E402


class Batches:
    """Four fixed batches (images pinned, as the loader pins them); sync debug mode 'error' is on
    while steps 2 and 3 run."""

    def __init__(self, batches):
        self.batches, self.batch_size = batches, batches[0][0].size(0)
        self.sampler = argparse.Namespace(set_epoch=lambda epoch, start=0: None)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == 1:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode('error')
            if i == 3:
                torch.cuda.set_sync_debug_mode('default')
            yield batch, 0
        torch.cuda.set_sync_debug_mode('default')


class Tokenizer(bench.FakeTokenizer):
    """Returns the benchmark's token ids for the 'captions' (here: the batch's index)."""

    def __init__(self, texts):
        self.texts = texts

    def __call__(self, key, **kwargs):
        return self.texts[key]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', choices=sorted(bench.SIZES), default='base')
    parser.add_argument('--batch', type=int, default=None)
    parser.add_argument('--amp', choices=('off', 'bf16', 'fp16'), default='bf16')
    args = parser.parse_args()
    device = torch.device('cuda')
    config = bench.model_config(args.size)
    batch = args.batch or bench.SIZES[args.size]['batch']
    model, optimizer = bench.build('default', config, device)
    batches, texts = [], []
    for i in range(4):
        image, text = bench.fixed_batch(config, batch, seed=i)
        batches.append((image.pin_memory(), i))
        texts.append(text)
    run = engine.Run(args=argparse.Namespace(seed=0), config={
        'alpha': 0.4, 'print_freq': 1000, 'schedular': {'warmup_epochs': 0}}, device=device, amp=args.amp,
        tokenizer=Tokenizer(texts), scaler=torch.amp.GradScaler('cuda', enabled=args.amp == 'fp16'))

    class NoScheduler:
        def step_iteration(self, *a):
            pass
    result = {'sync_check': 'passed', 'size': args.size, 'batch': batch, 'amp': args.amp}
    try:
        engine.train_one_epoch(model, Batches(batches), optimizer, NoScheduler(), 1, run, TrainState(),
                               lambda m, b, a: Pretrain.train_step(m, b, a, run))
    except RuntimeError as error:
        torch.cuda.set_sync_debug_mode('default')
        result['sync_check'] = f'failed: {str(error).splitlines()[0]}'
    print(json.dumps(result))
    if result['sync_check'] != 'passed':
        sys.exit(1)


if __name__ == '__main__':
    main()
