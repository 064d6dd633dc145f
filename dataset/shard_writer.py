"""The JSON-to-shards converter behind `python -m dataset.shards CONFIG --out DIR`: the items of
a pre-training config's `train_file` and their images, written with webdataset's ShardWriter."""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from typing import Sequence

import webdataset as wds
from PIL import Image

from configuration import one_line
from .base import DataError

logger = logging.getLogger('dataset.shards')


def convert(config: dict, out: str, shard_size: int = 10_000, progress: bool = True) -> dict:
    """Write the pre-training items of `config` (train_file) into `out`/%06d.tar. Returns the
    summary {'samples', 'shards', 'missing', 'unreadable', 'pattern'}."""
    from .caption_dataset import pretrain_dataset
    if 'train_file' not in config:
        raise DataError("config has no 'train_file' (the JSON annotations to convert)")
    dataset = pretrain_dataset(config['train_file'], None, check_images=False)
    os.makedirs(out, exist_ok=True)
    summary = {'samples': 0, 'missing': 0, 'unreadable': 0}
    bar = None
    if progress:
        import utils
        bar = utils.progress(total=len(dataset), desc='writing shards', unit='sample')
    with wds.ShardWriter(os.path.join(out, '%06d.tar'), maxcount=shard_size, verbose=0) as sink:
        for index in range(len(dataset)):
            item = dataset.ann[index]
            path = item['image']
            try:
                with open(path, 'rb') as f:
                    data = f.read()
                with Image.open(io.BytesIO(data)) as img:
                    fmt = (img.format or '').lower()
                    img.verify()
            except FileNotFoundError:
                summary['missing'] += 1
                logger.warning('image not found: %s (%s)', path, dataset.where(index))
                data = None
            except Exception as error:
                summary['unreadable'] += 1
                logger.warning('cannot read image %s (%s): %s', path, dataset.where(index), one_line(error))
                data = None
            if data is not None:
                ext = {'jpeg': 'jpg', 'png': 'png', 'webp': 'webp'}.get(fmt)
                if ext is None:  # another format: stored as a JPEG
                    buffer = io.BytesIO()
                    with Image.open(io.BytesIO(data)) as img:
                        img.convert('RGB').save(buffer, format='JPEG', quality=95)
                    data, ext = buffer.getvalue(), 'jpg'
                captions = item['caption'] if isinstance(item['caption'], list) else [item['caption']]
                sink.write({'__key__': f'{index:09d}', ext: data, 'txt': captions[0],
                            'json': {'captions': captions, 'image': path}})
                summary['samples'] += 1
            if bar is not None:
                bar.update(1)
        shards = sink.shard
    if bar is not None:
        bar.close()
    summary['shards'] = shards
    summary['pattern'] = os.path.join(out, f'{{000000..{max(shards - 1, 0):06d}}}.tar')
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m dataset.shards', description=(
        "Convert a pre-training config's JSON annotations (train_file) and images into tar shards."))
    parser.add_argument('config', help='pre-training YAML (its train_file is converted)')
    parser.add_argument('--out', required=True, help='folder for the shards (000000.tar, 000001.tar, ...)')
    parser.add_argument('--shard-size', type=int, default=10_000, help='samples per shard (default 10000)')
    args = parser.parse_args(argv)
    from .check import load_config
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    if args.shard_size < 1:
        print('error: --shard-size must be at least 1', file=sys.stderr)
        return 2
    try:
        summary = convert(load_config(args.config), args.out, args.shard_size)
    except DataError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(f"{summary['samples']} samples written to {summary['shards']} shards in {args.out}; "
          f"images missing: {summary['missing']}, unreadable: {summary['unreadable']}")
    print(f"train_shards: '{summary['pattern']}'")
    return 0
