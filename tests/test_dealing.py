"""Every sample once per epoch from tar shards of any sizes, over any number of processes, loader
workers and batch size: the deal (dataset.dealing) run through the real ShardStream, processes
simulated as rank r of W in this process and workers through torch's worker info, as the stream
reads them. Also: the img2dataset layout, a shard cut short after it was counted, the epoch's
counts, and the one-line errors of bad shard lists."""
import io
import json
import os
import types

import pytest
import torch
import webdataset as wds
from PIL import Image

from dataset import DataError
from dataset.dealing import EpochPlan, quotas_of
from dataset.loaders import StreamLoader
from dataset.shards import ShardStream, check_first_samples, expand, shard_sizes

SIZES = [48, 47, 49, 50, 49, 50, 10]  # what img2dataset wrote for 310 URLs at 50 per shard


def png(value):
    buffer = io.BytesIO()
    Image.new('RGB', (2, 2), (value % 256, 0, 0)).save(buffer, format='PNG')
    return buffer.getvalue()


def write_shards(folder, sizes, digits=5, stats=True):
    """Shards as img2dataset writes them: 00000.tar with KEY.jpg/png, KEY.txt, KEY.json, and
    00000_stats.json beside it (img2dataset's keys, indent 4)."""
    urls = []
    for shard, size in enumerate(sizes):
        name = f'{shard:0{digits}d}'
        with wds.TarWriter(os.path.join(folder, f'{name}.tar')) as sink:
            for i in range(size):
                key = f'{name}{i:04d}'
                sink.write({'__key__': key, 'png': png(i), 'txt': f'sample {shard} {i}',
                            'json': {'url': f'http://127.0.0.1/{key}.png', 'key': key, 'status': 'success',
                                     'caption': f'sample {shard} {i}', 'width': 2, 'height': 2}})
        if stats:
            with open(os.path.join(folder, f'{name}_stats.json'), 'w') as f:
                json.dump({'count': size + 2, 'successes': size, 'failed_to_download': 2, 'failed_to_resize': 0,
                           'duration': 1.5, 'status_dict': {'success': size, 'HTTP Error 404': 2}}, f, indent=4)
        urls.append(os.path.join(folder, f'{name}.tar'))
    return urls


@pytest.fixture(scope='module')
def web_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp('img2dataset')
    write_shards(str(folder), SIZES)
    return str(folder)


def run_epoch(urls, sizes, monkeypatch, *, world_size, num_workers, batch_size, epoch, shuffle_buffer=16, **kw):
    """[rank][worker] -> the captions that stream delivered, in order."""
    out = []
    for rank in range(world_size):
        stream = ShardStream(urls, None, batch_size=batch_size, num_workers=num_workers, rank=rank,
                             world_size=world_size, seed=7, sizes=sizes, shuffle_buffer=shuffle_buffer, **kw)
        stream.set_epoch(epoch)
        per_worker = []
        for worker in range(num_workers):
            info = types.SimpleNamespace(id=worker, num_workers=num_workers)
            monkeypatch.setattr(torch.utils.data, 'get_worker_info', lambda: info)
            per_worker.append([item[1] for item, _ in stream])
        out.append((stream.steps, per_worker))
    return out


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_every_sample_once_per_epoch_any_shard_sizes(web_shards, monkeypatch, world_size):
    urls = expand(os.path.join(web_shards, '*.tar'))
    sizes = shard_sizes(urls, cache_dir=os.path.join(web_shards, 'cache'))
    assert sizes == SIZES  # from the _stats.json files
    everything = {f'sample {s} {i}' for s, size in enumerate(SIZES) for i in range(size)}
    for num_workers in (1, 2, 3):
        for batch_size in (8, 13):
            seen_by_end, orders = set(), []
            for epoch in range(3):
                epoch_out = run_epoch(urls, sizes, monkeypatch, world_size=world_size, num_workers=num_workers,
                                      batch_size=batch_size, epoch=epoch)
                steps = epoch_out[0][0]
                assert steps == sum(SIZES) // (world_size * batch_size)
                trained = []
                for _, per_worker in epoch_out:  # every rank does `steps` steps, each worker its turns
                    assert [len(c) for c in per_worker] == quotas_of(steps, batch_size, 1, num_workers)
                    trained += [c for captions in per_worker for c in captions]
                case = (world_size, num_workers, batch_size, epoch)
                assert len(trained) == steps * batch_size * world_size, case
                assert len(set(trained)) == len(trained), case  # no sample twice in an epoch
                assert set(trained) <= everything
                seen_by_end |= set(trained)
                orders.append([captions for _, per_worker in epoch_out for captions in per_worker])
            assert seen_by_end == everything, (world_size, num_workers, batch_size)
            assert orders[0] != orders[1] != orders[2] != orders[0]


def test_a_different_order_every_epoch(web_shards, monkeypatch):
    # the shard order of the deal is drawn per epoch ...
    plans = [EpochPlan(SIZES, 0, quotas_of(9, 11, 3, 3), seed=7, epoch=e) for e in range(3)]
    common = set.intersection(*({s for s, _, _ in p.sequence} for p in plans))
    orders = [[s for s, _, _ in p.sequence if s in common] for p in plans]
    assert orders[0] != orders[1] and orders[1] != orders[2]
    # ... and so is the shuffle buffer: one shard, one stream, all of it in every epoch
    url = os.path.join(web_shards, '00000.tar')
    epochs = [run_epoch([url], [48], monkeypatch, world_size=1, num_workers=1, batch_size=8, epoch=e,
                        shuffle_buffer=48)[0][1][0] for e in range(3)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    # ... and a stream reads the shards in the deal's order: without the buffer (1 sample) the order
    # in which the shards first appear changes from epoch to epoch, the same again for the same seed
    urls = expand(os.path.join(web_shards, '*.tar'))

    def shard_order(epoch):
        captions = run_epoch(urls, SIZES, monkeypatch, world_size=1, num_workers=1, batch_size=8, epoch=epoch,
                             shuffle_buffer=1)[0][1][0]
        return list(dict.fromkeys(int(caption.split()[1]) for caption in captions))  # 'sample SHARD INDEX'
    first, second = shard_order(0), shard_order(1)
    assert sorted(first) == sorted(second) == list(range(len(SIZES))), (first, second)
    assert first != second and shard_order(0) == first


def test_resume_mid_epoch_on_uneven_shards_continues_the_same_batches(web_shards):
    urls = expand(os.path.join(web_shards, '*.tar'))

    def batches(start):
        stream = ShardStream(urls, None, batch_size=8, num_workers=2, rank=1, world_size=2, seed=5, sizes=SIZES,
                             shuffle_buffer=10)
        stream.set_epoch(1, start)
        loader = torch.utils.data.DataLoader(stream, batch_size=8, num_workers=2, drop_last=True,
                                             collate_fn=lambda pairs: [p[0][1] for p in pairs])
        return list(loader)
    full = batches(0)
    assert len(full) == 303 // 16 and batches(5 * 8) == full[5:]


def test_json_items_join_the_deal(web_shards, monkeypatch):
    urls = expand(os.path.join(web_shards, '{00005..00006}.tar'))
    items = [(None, f'json item {i}') for i in range(25)]
    out = run_epoch(urls, [50, 10], monkeypatch, world_size=2, num_workers=2, batch_size=7, epoch=1,
                    json_dataset=items)
    trained = [c for _, per_worker in out for captions in per_worker for c in captions]
    assert len(trained) == len(set(trained)) == 2 * 6 * 7
    assert 15 <= sum(c.startswith('json') for c in trained) <= 25  # both sources, in proportion


def test_short_shard_is_reported_once_and_every_rank_keeps_its_steps(tmp_path, capsys):
    urls = write_shards(str(tmp_path), [30, 30, 30])
    with open(tmp_path / '00001_stats.json', 'w') as f:  # counted 30, then cut to 12 samples
        json.dump({'count': 30, 'successes': 30}, f)
    (tmp_path / 'cut').mkdir()
    write_shards(str(tmp_path / 'cut'), [12], stats=False)
    os.replace(tmp_path / 'cut' / '00000.tar', urls[1])
    sizes = shard_sizes(urls, cache_dir=str(tmp_path / 'cache'))
    assert sizes == [30, 30, 30]
    for rank in range(2):
        stream = ShardStream(urls, None, batch_size=5, num_workers=2, rank=rank, world_size=2, seed=1,
                             sizes=sizes, shuffle_buffer=4)
        loader = StreamLoader(stream, num_workers=2, collate_fn=lambda items: items)
        for epoch in range(2):
            stream.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == stream.steps == 9  # 90 counted // (2 x 5): no rank waits on another
            counts = loader.epoch_counts()
            assert counts['samples'] == 45 and counts['left_out_samples'] == 0
            if counts['shards_cut_short']:
                assert counts['distinct_samples'] < 45  # what was missing was made up by repeats
    warnings = [line for line in capsys.readouterr().err.splitlines() if 'has 12 samples' in line]
    assert len(warnings) in (1, 2)  # once per run in each process that met it
    assert warnings[0] == (f'warning: shard {urls[1]} has 12 samples, its count says 30 (cut short after it '
                           f'was counted?); the epoch trains others in their place')


def test_epoch_counts_with_real_workers(web_shards):
    urls = expand(os.path.join(web_shards, '{00000..00006}.tar'))
    stream = ShardStream(urls, None, batch_size=20, num_workers=2, seed=0, sizes=SIZES)
    loader = StreamLoader(stream, num_workers=2, collate_fn=lambda items: items)
    stream.set_epoch(0)
    captions = [c for batch in loader for _, c in batch]
    assert len(captions) == len(set(captions)) == 300
    assert loader.epoch_counts() == {'samples': 300, 'distinct_samples': 300, 'left_out_samples': 3,
                                     'shards_cut_short': 0}


def test_shard_lists_name_what_is_wrong(tmp_path, web_shards):
    assert expand(os.path.join(web_shards, '*.tar')) == [os.path.join(web_shards, f'{i:05d}.tar') for i in range(7)]
    assert expand(os.path.join(web_shards, '0000[0-1].tar')) == expand(os.path.join(web_shards, '{00000..00001}.tar'))
    with pytest.raises(DataError) as info:
        expand(str(tmp_path / 'cc12m' / '*.tar'))
    assert str(info.value) == f'train_shards: no file matches {tmp_path}/cc12m/*.tar'
    with pytest.raises(DataError) as info:
        expand(str(tmp_path / '{000000..000002}.tar'))
    assert str(info.value) == (f'train_shards: shard not found: {tmp_path}/000000.tar '
                               f'(from {tmp_path}/{{000000..000002}}.tar)')
    (tmp_path / 'page.tar').write_text('<html>not a tar</html>\n' * 40)
    with pytest.raises(DataError) as info:
        shard_sizes([str(tmp_path / 'page.tar')], cache_dir=str(tmp_path / 'cache'))
    assert str(info.value).startswith(f'train_shards: {tmp_path}/page.tar is not a tar file (')
    with wds.TarWriter(str(tmp_path / 'nocaption.tar')) as sink:
        for i in range(12):
            sink.write({'__key__': f'k{i}', 'png': png(i), 'cls': b'3'})
    with pytest.raises(DataError) as info:
        check_first_samples(str(tmp_path / 'nocaption.tar'))
    assert str(info.value) == (f'train_shards: none of the first 10 samples can be trained on; the first: '
                               f'{tmp_path}/nocaption.tar:k0: no caption (txt, or json with "caption" or '
                               f'"captions") in the sample')


@pytest.mark.parametrize('case', ['glob', 'not_tar', 'no_caption'])
def test_pretrain_bad_shards_one_line(demo_config, tmp_path, monkeypatch, capsys, case):
    shards = tmp_path / 'shards'
    shards.mkdir()
    if case == 'not_tar':
        write_shards(str(shards), [10], stats=False)
        (shards / '00001.tar').write_text('<html>404</html>\n')
        pattern, expected = str(shards / '{00000..00001}.tar'), f'{shards}/00001.tar is not a tar file ('
    elif case == 'no_caption':
        with wds.TarWriter(str(shards / '00000.tar')) as sink:
            for i in range(20):
                sink.write({'__key__': f'k{i}', 'png': png(i)})
        pattern, expected = str(shards / '*.tar'), 'none of the first 10 samples can be trained on'
    else:
        pattern, expected = str(shards / 'missing' / '*.tar'), f'no file matches {shards}/missing/*.tar'
    config = demo_config('Pretrain_shards', train_shards=pattern, num_workers=1)
    monkeypatch.setenv('ALBEF_CACHE', str(tmp_path / 'cache'))
    import engine
    import Pretrain
    with pytest.raises(SystemExit) as info:
        engine.launch(Pretrain.main, Pretrain.get_parser(),
                      ['--config', config, '--output_dir', str(tmp_path / 'out'), '--device', 'cpu'])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f'error: train_shards: {expected}'), err[-2000:]
    assert not any('no readable sample' in line or 'Traceback' in line for line in lines)
    assert lines[-1] == err.strip().split('\r')[-1].splitlines()[-1]  # on a line of its own


# ---- big annotation files, parsed a chunk at a time ------------------------------------------------
def test_big_annotation_file_parsed_in_chunks_gives_the_same_table(tmp_path, monkeypatch):
    from dataset import annotation_cache
    from dataset.caption_dataset import pretrain_dataset
    monkeypatch.setattr(annotation_cache, 'CHUNK_ITEMS', 7)
    monkeypatch.setattr(pretrain_dataset, 'cache_above', 100)
    items = [{'image': f'/data/cc/{i // 5:03d}/{i}.jpg', 'caption': f'caption {i} ✓'} for i in range(30)]
    items[23]['caption'] = ['one of two', 'two of two']  # a list only in the fourth chunk
    items[24]['image'] = '/data/elsewhere/x.jpg'
    path = tmp_path / 'big.json'
    path.write_text(json.dumps(items, indent=1))
    first = pretrain_dataset(str(path), None, cache_dir=str(tmp_path / 'cache'), check_images=False)
    assert list(first.ann) == items and first.ann.folders[:2] == ['/data/cc/000/', '/data/cc/001/']
    record = json.load(open(next((tmp_path / 'cache' / 'annotations').glob('*/conversion.json'))))
    assert record['items'] == 30
    (tmp_path / 'cache' / 'annotations').rename(tmp_path / 'kept')  # not the cache: parsed again below
    monkeypatch.setattr(annotation_cache, 'CHUNK_ITEMS', 1000)
    assert list(pretrain_dataset(str(path), None, cache_dir=str(tmp_path / 'c2'), check_images=False).ann) == items

    items[26]['caption'] = ['fine', 5]  # named by its place in the file, not in its chunk
    path.write_text(json.dumps(items, indent=1))
    monkeypatch.setattr(annotation_cache, 'CHUNK_ITEMS', 7)
    with pytest.raises(DataError) as info:
        pretrain_dataset(str(path), None, cache_dir=str(tmp_path / 'c3'), check_images=False)
    assert str(info.value) == f"{path}: item 26 has a number at position 1 of its 'caption' list (expected strings)"
    path.write_text(json.dumps(items[:20], indent=1)[:-40] + ' ,]' + ' ' * 200)
    with pytest.raises(DataError) as info:
        pretrain_dataset(str(path), None, cache_dir=str(tmp_path / 'c4'), check_images=False)
    assert str(info.value).startswith(f'{path}: invalid JSON at line ')  # the json module's own position
    path.write_text(json.dumps({'items': items}))
    with pytest.raises(DataError) as info:
        pretrain_dataset(str(path), None, cache_dir=str(tmp_path / 'c5'), check_images=False)
    assert str(info.value) == f'{path}: expected a JSON list, got an object'
