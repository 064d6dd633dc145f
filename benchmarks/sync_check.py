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
from dataset import Batch  # noqa: E402
from models.losses import mask_tokens  # noqa: E402
from engine.checkpointing import TrainState  # noqa: E402
import Pretrain  # noqa: E402
import train_step as bench  # noqa: E402


class Batches:
    """A loader of fixed batches for train_one_epoch that runs `start()` before step 2 and `stop()`
    after step 3 (and at the end): the window the checks watch. tests/test_no_sync.py uses it too."""

    def __init__(self, batches, start, stop):
        self.batches, self.start, self.stop = batches, start, stop
        self.batch_size = len(batches[0].image)
        self.sampler = argparse.Namespace(set_epoch=lambda epoch, start=0: None)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        watching = False
        try:
            for i, batch in enumerate(self.batches):
                if i in (1, 3):
                    (self.stop if watching else self.start)()
                    watching = not watching
                yield batch
        finally:
            if watching:  # the loop stopped inside the window (an error in step 2 or 3)
                self.stop()


def sync_errors_on():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')


def sync_errors_off():
    torch.cuda.set_sync_debug_mode('default')


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
    batches = []
    for i in range(4):  # as the loader delivers them: pinned uint8 images, captions tokenised and masked
        _, text = bench.fixed_batch(config, batch, seed=i)
        image = torch.randint(0, 256, (batch, 3, config['image_res'], config['image_res']), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(i))
        input_ids, labels = text.input_ids.clone(), text.input_ids.clone()
        tokenizer = model.tokenizer
        mask_tokens(input_ids, model.text_encoder.config.vocab_size, tokenizer.pad_token_id, tokenizer.cls_token_id,
                    tokenizer.mask_token_id, targets=labels, probability_matrix=torch.full(labels.shape, 0.15))
        batches.append(Batch(image=image, text=text, mlm=(input_ids, labels)).pin_memory())
    run = engine.Run(args=argparse.Namespace(seed=0), config={
        'alpha': 0.4, 'print_freq': 1000, 'schedular': {'warmup_epochs': 0}}, device=device, amp=args.amp,
        scaler=torch.amp.GradScaler('cuda', enabled=args.amp == 'fp16'))

    class NoScheduler:
        def step_iteration(self, *a):
            pass
    result = {'sync_check': 'passed', 'size': args.size, 'batch': batch, 'amp': args.amp}
    try:
        engine.train_one_epoch(model, Batches(batches, sync_errors_on, sync_errors_off), optimizer, NoScheduler(), 1, run, TrainState(),
                               lambda m, b, a, **step: Pretrain.train_step(m, b, a, run, **step))
    except RuntimeError as error:
        sync_errors_off()
        result['sync_check'] = f'failed: {str(error).splitlines()[0]}'
    print(json.dumps(result))
    if result['sync_check'] != 'passed':
        sys.exit(1)


if __name__ == '__main__':
    main()
