"""Samples per second of one loader worker: the original's pipeline, our JSON path, our shard path.

    python benchmarks/data_loader.py                      # 640x480 and 1280x960, 200 images each
    python benchmarks/data_loader.py --images 400 --rounds 5
    python benchmarks/data_loader.py --workers 14 --sizes 640x480   # the real loader, 14 workers

Generates JPEGs (quality 90, smooth random content so they compress like photos) at each size,
as files and as tar shards (webdataset's ShardWriter), then times, in one process (= one worker),
alternating the paths for --rounds rounds and printing medians side by side:

  original      one file per sample: PIL open + convert, RandomResizedCrop(256, scale 0.2-1,
                bicubic), horizontal flip, RandomAugment(2, 7), ToTensor, Normalize (float32)
  json          ours from JSON annotations: pretrain_dataset as dataset.loaders.train_loader serves it
                (SeededSamples), the same transforms ending in a uint8 tensor (normalised later
                on the device)
  json+draft    the same with jpeg_draft: true (Pillow decodes at 1/2, 1/4 or 1/8 size where the
                crop keeps its resolution; changes pixels slightly, so opt-in)
  shards        ours from tar shards: ShardStream (reads the tar sequentially, decodes, same
                transforms, uint8)
  shards+draft  the same with jpeg_draft

Tokenisation is left out (it runs in the workers' collate, per batch, on both paths); so is the
image normalisation on the device. The ratios are per worker: the loader's throughput is that
times the number of workers; the last table divides --target pairs/s (default 1,500, the GPU step's
goal) by each rate: the loader workers, hence cores, one GPU needs.
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)


def make_images(folder, size, count, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    width, height = size
    paths = []
    for i in range(count):
        path = os.path.join(folder, f'{i:06d}.jpg')
        paths.append(path)
        if os.path.isfile(path):
            continue
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        noise = rng.integers(-12, 13, (height, width, 3))
        image = Image.fromarray(np.clip(np.asarray(image).astype(int) + noise, 0, 255).astype(np.uint8))
        image.save(path, quality=90)
    return paths


def write_shards(paths, folder):
    import webdataset as wds
    os.makedirs(folder, exist_ok=True)
    with wds.ShardWriter(os.path.join(folder, '%06d.tar'), maxcount=100, verbose=0) as sink:
        for i, path in enumerate(paths):
            with open(path, 'rb') as f:
                sink.write({'__key__': f'{i:06d}', 'jpg': f.read(), 'txt': f'a synthetic photo number {i}'})
        return [os.path.join(folder, f'{k:06d}.tar') for k in range(sink.shard)]


def original_pipeline(paths):
    from PIL import Image
    from torchvision import transforms
    from dataset.randaugment import RandomAugment
    from dataset import AUGMENTS, MEAN, STD
    transform = transforms.Compose([
        transforms.RandomResizedCrop(256, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), RandomAugment(2, 7, isPIL=True, augs=AUGMENTS),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def run():
        for path in paths:
            transform(Image.open(path).convert('RGB'))
    return run


def json_pipeline(paths, folder, draft):
    from dataset import build_transform
    from dataset.caption_dataset import pretrain_dataset
    ann = os.path.join(folder, 'pretrain.json')
    with open(ann, 'w') as f:
        json.dump([{'image': p, 'caption': f'a synthetic photo number {i}'} for i, p in enumerate(paths)], f)
    from dataset.loaders import SeededSamples
    # as train_loader serves it: each sample's augmentation seeded from (seed, epoch, index)
    dataset = SeededSamples(pretrain_dataset(ann, build_transform('pretrain', 256, uint8=True,
                                                                         jpeg_draft=draft)), seed=0)

    def run():
        for i in range(len(dataset)):
            dataset[(0, i)]
    return run


def shard_pipeline(urls, count, draft):
    from dataset import build_transform
    from dataset.shards import ShardStream
    stream = ShardStream(urls, build_transform('pretrain', 256, uint8=True, jpeg_draft=draft), batch_size=1,
                         num_workers=1, sizes=[100] * (count // 100) + ([count % 100] if count % 100 else []),
                         shuffle_buffer=100)

    def run():
        for _ in stream:
            pass
    return run


def loader_rate(args):
    """pairs/s of dataset.loaders.train_loader over the JSON path (decode, crop, RandomAugment,
    uint8, tokenised captions in the workers' collate) with args.workers workers, one image size."""
    from dataset.loaders import train_loader
    size = args.sizes.split(',')[0]
    width, height = map(int, size.split('x'))
    base = args.dir or tempfile.mkdtemp(prefix='albef_loader_')
    folder = os.path.join(base, size)
    paths = make_images(os.path.join(folder, 'images'), (width, height), args.images)
    json_pipeline(paths, folder, False)  # writes pretrain.json
    from dataset import build_transform
    from dataset.caption_dataset import pretrain_dataset
    dataset = pretrain_dataset(os.path.join(folder, 'pretrain.json'), build_transform('pretrain', 256, uint8=True))
    loader = train_loader(dataset, args.batch, {'num_workers': args.workers}, seed=0)
    start, pairs = None, 0
    for rnd in range(args.rounds + 1):  # round 0 starts the workers and is not timed
        if rnd == 1:
            start = time.perf_counter()
        for images, _ in loader:
            pairs += images.size(0) if rnd else 0
    rate = pairs / (time.perf_counter() - start)
    row = {'size': size, 'workers': args.workers, 'loader_pairs_per_s': rate}
    print(json.dumps(row))
    if args.json:
        with open(args.json, 'a') as f:
            f.write(json.dumps(row) + '\n')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=200, help='images per size')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--sizes', default='640x480,1280x960')
    parser.add_argument('--dir', default=None)
    parser.add_argument('--target', type=int, default=1500, help='pairs/s one GPU consumes (for the workers needed)')
    parser.add_argument('--workers', type=int, default=0,
                        help='instead: pairs/s of the real JSON loader (DataLoader) with this many workers')
    parser.add_argument('--batch', type=int, default=64, help='with --workers: the batch size')
    parser.add_argument('--json', help='append the results as JSON lines to this file')
    args = parser.parse_args()
    if args.workers:
        return loader_rate(args)
    base = args.dir or tempfile.mkdtemp(prefix='albef_loader_')
    names = ['original', 'json', 'json+draft', 'shards', 'shards+draft']
    table = {}
    for size in args.sizes.split(','):
        width, height = map(int, size.split('x'))
        folder = os.path.join(base, size)
        paths = make_images(os.path.join(folder, 'images'), (width, height), args.images)
        urls = write_shards(paths, os.path.join(folder, 'shards'))
        runs = {'original': original_pipeline(paths), 'json': json_pipeline(paths, folder, False),
                'json+draft': json_pipeline(paths, folder, True),
                'shards': shard_pipeline(urls, len(paths), False), 'shards+draft': shard_pipeline(urls, len(paths), True)}
        rates = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                start = time.perf_counter()
                runs[name]()
                rates[name].append(len(paths) / (time.perf_counter() - start))
        table[size] = {name: statistics.median(r) for name, r in rates.items()}
        print(f'{size}: ' + ', '.join(f'{n} {statistics.median(r):.1f}' for n, r in rates.items()), flush=True)

    print(f'\nsamples/s per worker (median of {args.rounds} alternating rounds of {args.images} images; '
          f'crop 256, scale 0.2-1, RandomAugment)')
    print(f"{'image size':12s}" + ''.join(f'{n:>14s}' for n in names))
    for size, row in table.items():
        print(f'{size:12s}' + ''.join(f'{row[n]:14.1f}' for n in names))
    print('ratio to the original:')
    for size, row in table.items():
        print(f'{size:12s}' + ''.join(f"{row[n] / row['original']:13.2f}x" for n in names))
    print(f'loader workers (= cores) per GPU for {args.target:,} pairs/s (the GPU step\'s goal):')
    for size, row in table.items():
        print(f'{size:12s}' + ''.join(f'{math.ceil(args.target / row[n]):14d}' for n in names))
    if args.json:
        with open(args.json, 'a') as f:
            for size, row in table.items():
                f.write(json.dumps({'size': size, 'per_worker': row, 'target_pairs_per_s': args.target,
                                    'workers_needed': {n: math.ceil(args.target / row[n]) for n in names}}) + '\n')


if __name__ == '__main__':
    main()
