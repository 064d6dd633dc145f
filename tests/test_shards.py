"""Pre-training data at scale: lean annotations, the lazy image check, uint8 images normalised on
the device, captions tokenised in the loader workers, tar shards (webdataset) split over processes
and workers, bad samples and shards skipped and counted, exact resume in the shard stream, the
JSON-to-shards converter, and two "nodes" under torchrun."""
import glob
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import dataset
from conftest import ROOT, _free_port, run_script
from dataset import DataError, ImageError
from dataset.base import StringColumn
from dataset.caption_dataset import CaptionTable, pretrain_dataset
from dataset.shards import ShardStream, expand, shard_sizes

SMALL = dict(batch_size=10, queue_size=40, num_workers=1, print_freq=2)


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def read_log(output_dir):
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def png_bytes(color, size=8):
    buffer = io.BytesIO()
    Image.new('RGB', (size, size), color).save(buffer, format='PNG')
    return buffer.getvalue()


# ---- lean annotations -----------------------------------------------------------------------------
def test_string_column_and_caption_table_round_trip():
    strings = ['', 'plain', 'ünïcødé ✓', 'a' * 300]
    column = StringColumn(strings)
    assert list(column) == strings and len(column) == 4
    assert list(StringColumn.concat([StringColumn(['x', 'yz']), StringColumn([]), column])) == ['x', 'yz'] + strings

    images = ['/data/cc3m/00001/000010001.jpg', '/data/cc3m/00001/000010002.jpg', 'relative.png', '/x/é.png']
    captions = ['one', ['two', 'three'], 'four', ['five']]
    table = CaptionTable(images, captions)
    assert table.folders == ['/data/cc3m/00001/', '', '/x/']
    expected = [{'image': i, 'caption': c} for i, c in zip(images, captions)]
    assert list(table) == expected and table[-1] == expected[-1]
    both = CaptionTable.concat([table, CaptionTable(['/x/b.png'], ['six'])])
    assert list(both) == expected + [{'image': '/x/b.png', 'caption': 'six'}] and both.folders == table.folders
    # the text of the file names and captions plus 21 bytes per item, not a dict per item
    names, texts = [f'{i:09d}.jpg' for i in range(20000)], [f'a photo of thing number {i}' for i in range(20000)]
    many = CaptionTable([f'/data/cc12m/{i // 10000:05d}/{n}' for i, n in enumerate(names)], texts)
    assert many.nbytes <= sum(map(len, names + texts)) + 21 * 20000 + 2 * 100
    assert many[12345] == {'image': '/data/cc12m/00001/000012345.jpg', 'caption': 'a photo of thing number 12345'}
    mixed = CaptionTable.concat([many, table])
    assert mixed[20001] == expected[1] and mixed[19999]['caption'] == texts[-1]


def test_pretrain_dataset_lean_storage_keeps_errors(tmp_path):
    path = tmp_path / 'pre.json'
    path.write_text(json.dumps([{'image': 'a.png', 'caption': 'x'}, {'image': 'b.png', 'caption': ['y', 3]}]))
    with pytest.raises(DataError) as info:
        pretrain_dataset(str(path), None, check_images=False)
    assert str(info.value) == f"{path}: item 1 has a number at position 1 of its 'caption' list (expected strings)"
    path.write_text(json.dumps([{'image': 'a.png', 'caption': 'x'}, {'image': None, 'caption': 'y'}]))
    with pytest.raises(DataError, match=r"item 1 has 'image' of type NoneType \(expected a string\)"):
        pretrain_dataset(str(path), None, check_images=False)
    path.write_text(json.dumps([{'image': 'a.png', 'caption': 'x'}, {'caption': 'y'}]))
    with pytest.raises(DataError, match=r"item 1 has no 'image' \(keys: 'caption'\)"):
        pretrain_dataset(str(path), None, check_images=False)


def test_big_pretraining_sets_check_images_when_reached(tmp_path, monkeypatch):
    good = tmp_path / 'good.png'
    good.write_bytes(png_bytes((255, 0, 0)))
    (tmp_path / 'bad.png').write_bytes(b'not an image')
    items = [{'image': str(good), 'caption': 'red'}, {'image': str(tmp_path / 'gone.png'), 'caption': 'gone'},
             {'image': str(tmp_path / 'bad.png'), 'caption': 'bad'}]
    path = tmp_path / 'pre.json'
    path.write_text(json.dumps(items))
    with pytest.raises(DataError, match='image not found'):  # small: checked at start-up
        pretrain_dataset(str(path), None)
    monkeypatch.setattr(pretrain_dataset, 'check_images_above', 2)
    ds = pretrain_dataset(str(path), None)  # above the limit: no check at start-up
    assert ds[0][1] == 'red'
    with pytest.raises(ImageError) as info:
        ds[1]
    assert str(info.value) == f'image not found: {tmp_path / "gone.png"} (item 1 of {path})'
    with pytest.raises(ImageError, match=f'cannot read image {tmp_path / "bad.png"} \\(item 2 of {path}\\)'):
        ds[2]
    with pytest.raises(DataError, match='image not found'):
        pretrain_dataset(str(path), None, check_images=True)
    skipping = pretrain_dataset(str(path), None, skip_bad_images=True)
    assert [skipping[i][1] for i in range(3)] == ['red', 'red', 'red'] and skipping.num_skipped == 3


# ---- uint8 images and tokenisation in the workers -------------------------------------------------
@pytest.mark.parametrize('kind', ['pretrain', 'test'])
def test_uint8_images_normalised_on_device_equal_the_float_pipeline(kind):
    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(40, 50, 3) * 255).astype(np.uint8)) for _ in range(3)]
    as_float, as_uint8 = dataset.build_transform(kind, 32), dataset.build_transform(kind, 32, uint8=True)
    expected, got = [], []
    from dataset.utils import Seeded
    for i, image in enumerate(images):  # the same random crops, flips and RandomAugment ops
        with Seeded(i):
            expected.append(as_float(image))
        with Seeded(i):
            got.append(as_uint8(image))
    batch = torch.stack(got)
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 32, 32)
    assert torch.equal(dataset.normalize(batch), torch.stack(expected))


def test_seeded_draws_depend_on_the_seed_alone_and_leave_the_generators_as_they_were():
    from dataset.utils import Seeded
    draws = lambda: (random.random(), float(np.random.rand()), float(torch.rand(1)))  # noqa: E731
    with Seeded(7):
        first = draws()
    draws()  # the generators move on between the two samples
    with Seeded(7):
        assert draws() == first
    with Seeded(8):
        assert all(a != b for a, b in zip(draws(), first))
    after = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    with Seeded(9):
        draws()
    assert random.getstate() == after[0] and np.array_equal(np.random.get_state()[1], after[1])
    assert torch.equal(torch.get_rng_state(), after[2])


def test_jpeg_draft_decodes_smaller_only_where_the_crop_keeps_its_resolution(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin
    from dataset.utils import Seeded
    rng = np.random.RandomState(0)
    paths = {}
    for name, (w, h) in {'big': (1024, 768), 'small': (300, 200)}.items():
        small = Image.fromarray((rng.rand(h // 16, w // 16, 3) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        paths[name] = str(tmp_path / f'{name}.jpg')
        small.save(paths[name], quality=90)
    drafts, reduced = [], 0
    real_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, 'draft',
                        lambda self, mode, size: drafts.append(size) or real_draft(self, mode, size))
    draft, plain = dataset.build_transform('train', 64, uint8=True, jpeg_draft=True), \
        dataset.build_transform('train', 64, uint8=True)
    for seed in range(6):
        for name, path in paths.items():
            drafts.clear()
            with Seeded(seed):
                got = draft(Image.open(path))
            with Seeded(seed):
                expected = plain(Image.open(path).convert('RGB'))
            if not drafts:  # no reduction: exactly RandomResizedCrop's pixels
                assert torch.equal(got, expected), (name, seed)
            else:  # decoded at 1/2 .. 1/8 size: close, not equal
                width = Image.open(path).size[0]
                assert drafts[0][0] in (-(-width // 2), -(-width // 4), -(-width // 8)) and got.shape == expected.shape
                assert (got.float() - expected.float()).abs().mean() < 4
                reduced += 1
    assert reduced >= 3
    from dataset.caption_dataset import lazy_transform  # names the file like the eager path
    with pytest.raises(ImageError, match=f'image not found: {tmp_path}/gone.jpg \\(item 0 of x.json\\)'):
        lazy_transform(str(tmp_path / 'gone.jpg'), 'item 0 of x.json', draft)


def test_caption_collate_tokenises(tokenizer):
    collate = dataset.CaptionCollate(tokenizer)
    images = [torch.zeros(3, 4, 4, dtype=torch.uint8)] * 2
    batch = collate(list(zip(images, ['a red square', 'two ' * 40])))
    image, text = batch.image, batch.text
    assert batch.mlm is None and image.shape == (2, 3, 4, 4) and text.input_ids.shape == (2, 25)
    expected = tokenizer(['a red square', 'two ' * 40], padding='longest', truncation=True, max_length=25,
                         return_tensors='pt')
    assert torch.equal(text.input_ids, expected.input_ids) and torch.equal(text.attention_mask, expected.attention_mask)


def test_num_workers_default(monkeypatch):
    from dataset.loaders import num_workers_of
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(24)))
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    assert num_workers_of({}) == 12  # 12 CPUs per process, not capped
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '8')
    assert num_workers_of({}) == 3 and num_workers_of({'num_workers': 0}) == 0
    with pytest.raises(DataError, match="num_workers: expected a whole number >= 0, got 'four'"):
        num_workers_of({'num_workers': 'four'})


# ---- the shard stream -----------------------------------------------------------------------------
def demo_shards(world):
    return expand(os.path.join(world, 'shards', '{000000..000005}.tar'))


def stream_keys(urls, tmp_path, monkeypatch, *, world_size, num_workers, batch_size, epoch=0, start=0, tag='',
                **kwargs):
    """Per rank: the keys each delivered (from the sample log), and the batches of captions."""
    log = tmp_path / f'log{tag}'
    monkeypatch.setenv('ALBEF_SAMPLE_LOG', str(log))
    sizes = shard_sizes(urls, cache_dir=str(tmp_path / 'cache'))
    keys, batches = [], []
    for rank in range(world_size):
        stream = ShardStream(urls, None, batch_size=batch_size, num_workers=num_workers, rank=rank,
                             world_size=world_size, seed=3, sizes=sizes, **kwargs)
        stream.set_epoch(epoch, start)
        loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=lambda pairs: [p[0][1] for p in pairs], drop_last=True)
        batches.append(list(loader))
        assert len(batches[-1]) == stream.steps - start // batch_size
        rank_keys = []
        for path in glob.glob(str(log / f'samples_rank{rank}_worker*.tsv')):
            rank_keys += [line.split('\t')[1].strip() for line in open(path)]
        keys.append(rank_keys)
    return keys, batches


@pytest.mark.parametrize('world_size, num_workers, batch', [(2, 1, 10), (2, 2, 5), (4, 1, 5), (3, 4, 5)])
def test_every_sample_once_per_epoch(demo_world, tmp_path, monkeypatch, world_size, num_workers, batch):
    # 6 shards of 10 samples, G = processes x workers streams: G = 2, whole shards; G = 4, one
    # whole shard each and the 2 left over split by sample; G = 12, every shard split by sample
    urls = demo_shards(demo_world)
    keys, _ = stream_keys(urls, tmp_path, monkeypatch, world_size=world_size, num_workers=num_workers,
                          batch_size=batch)
    seen = [k for rank in keys for k in rank]
    assert len(seen) == len(set(seen)) == 60
    assert {k.rsplit(':', 1)[1] for k in seen} == {f'train_{i:05d}' for i in range(60)}
    assert all(len(rank) == 60 // world_size for rank in keys)


def test_json_items_and_shards_together(demo_world, tmp_path, monkeypatch):
    urls = demo_shards(demo_world)
    json_items = pretrain_dataset(os.path.join(demo_world, 'pretrain.json'), None)
    keys, batches = stream_keys(urls, tmp_path, monkeypatch, world_size=2, num_workers=1, batch_size=10,
                                json_dataset=json_items)
    seen = keys[0] + keys[1]
    assert len(seen) == len(set(seen)) == 120 and len(batches[0]) == len(batches[1]) == 6
    assert sorted(k for k in seen if k.startswith('json:')) == sorted(f'json:{i}' for i in range(60))


def test_resume_mid_epoch_continues_the_same_batches(demo_world, tmp_path, monkeypatch):
    urls = demo_shards(demo_world)
    _, full = stream_keys(urls, tmp_path, monkeypatch, world_size=1, num_workers=2, batch_size=5, epoch=1,
                          shuffle_buffer=7, tag='a')
    _, rest = stream_keys(urls, tmp_path, monkeypatch, world_size=1, num_workers=2, batch_size=5, epoch=1,
                          start=15, shuffle_buffer=7, tag='b')
    assert len(full[0]) == 12 and rest[0] == full[0][3:]
    _, other_epoch = stream_keys(urls, tmp_path, monkeypatch, world_size=1, num_workers=2, batch_size=5, epoch=2,
                                 shuffle_buffer=7, tag='c')
    assert other_epoch[0] != full[0]


def test_bad_samples_and_truncated_shards_are_skipped_and_counted(tmp_path, caplog):
    # written with webdataset's own TarWriter; shard 1 is cut off in the middle of a member
    urls = []
    for shard in range(2):
        path = str(tmp_path / f'{shard}.tar')
        with wds.TarWriter(path) as sink:
            for i in range(6):
                image = b'\xff\xd8\xff\xe0 broken jpeg' if (shard, i) == (0, 2) else png_bytes((10 * i, 0, 0))
                sink.write({'__key__': f's{shard}_{i}', 'png' if (shard, i) != (0, 2) else 'jpg': image,
                            'txt': f'caption {shard} {i}'})
        urls.append(path)
    with tarfile.open(urls[1]) as tar:
        cut = [m for m in tar.getmembers() if m.name == 's1_3.png'][0].offset_data + 10
    with open(urls[1], 'r+b') as f:
        f.truncate(cut)
    sizes = shard_sizes(urls, cache_dir=str(tmp_path / 'cache'))
    assert sizes == [6, 4]  # the truncated shard's last readable image is s1_3
    stream = ShardStream(urls, None, batch_size=2, num_workers=1, seed=0, sizes=sizes, samples_per_epoch=8,
                         shuffle_buffer=1)
    items = list(stream)
    captions = [item[0][1] for item in items]
    assert len(captions) == 8 and 'caption 0 2' not in captions
    assert sum(info[0] for _, info in items) == 2  # the broken JPEG and the truncated shard
    messages = ' '.join(r.getMessage() for r in caplog.records)
    assert 'cannot decode image' in messages and 's0_2.jpg' in messages and f'skipped the rest of shard {urls[1]}' in messages


def test_img2dataset_layout_and_stats(tmp_path):
    # img2dataset: 00000.tar with KEY.jpg, KEY.txt, KEY.json, and 00000_stats.json beside it
    path = tmp_path / '00000.tar'
    buffer = io.BytesIO()
    Image.new('RGB', (16, 12), (0, 200, 0)).save(buffer, format='JPEG')
    with wds.TarWriter(str(path)) as sink:
        for i in range(3):
            sink.write({'__key__': f'00000{i:04d}', 'jpg': buffer.getvalue(), 'txt': f'A Green Box, number {i}!',
                        'json': {'url': f'http://example.com/{i}.jpg', 'caption': f'A Green Box, number {i}!',
                                 'key': f'00000{i:04d}', 'status': 'success', 'width': 16, 'height': 12}})
    (tmp_path / '00000_stats.json').write_text(json.dumps({'count': 5, 'successes': 3, 'failed_to_download': 2}))
    assert shard_sizes([str(path)], cache_dir=str(tmp_path / 'cache')) == [3]
    (tmp_path / '00000_stats.json').unlink()
    assert shard_sizes([str(path)], cache_dir=str(tmp_path / 'cache2')) == [3]  # counted from the tar
    stream = ShardStream([f'file:{path}'], dataset.build_transform('test', 8, uint8=True), batch_size=3,
                         num_workers=1, sizes=[3])
    items = [item for item, _ in stream]
    assert sorted(c for _, c in items) == [f'a green box number {i}' for i in range(3)]
    assert all(image.dtype == torch.uint8 and image.shape == (3, 8, 8) for image, _ in items)


def test_unreadable_everything_is_one_clear_error(tmp_path):
    path = tmp_path / 'empty.tar'
    with wds.TarWriter(str(path)) as sink:
        sink.write({'__key__': 'a', 'txt': 'no image here'})
    stream = ShardStream([str(path)], None, batch_size=1, num_workers=1, sizes=[1])
    with pytest.raises(DataError, match='train_shards: no readable sample for stream 0 of 1 \\(1 shards\\)'):
        list(stream)
    with pytest.raises(DataError, match='shard not found'):
        shard_sizes([str(tmp_path / 'gone.tar')], cache_dir=str(tmp_path))


def test_converter_writes_shards_that_load(demo_world, demo_config, tmp_path):
    from ruamel.yaml import YAML
    items = json.load(open(os.path.join(demo_world, 'pretrain.json')))
    (tmp_path / 'bad.png').write_bytes(b'garbage')
    extra = [{'image': str(tmp_path / 'gone.png'), 'caption': 'x'}, {'image': str(tmp_path / 'bad.png'), 'caption': 'y'}]
    ann = tmp_path / 'pre.json'
    ann.write_text(json.dumps(items[:30] + extra + items[30:]))
    config = demo_config('Pretrain', train_file=[str(ann)])
    out = tmp_path / 'shards'
    result = subprocess.run([sys.executable, '-m', 'dataset.shards', config, '--out', str(out), '--shard-size', '25'],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f'60 samples written to 3 shards in {out}; images missing: 1, unreadable: 1' in result.stdout
    assert f"train_shards: '{out}/{{000000..000002}}.tar'" in result.stdout
    # into a pipe, no progress bar frames: a plain line every tenth, none in a conversion under 10 s
    assert 'image not found' in result.stderr and 'writing shards' not in result.stderr
    urls = expand(f'{out}/{{000000..000002}}.tar')
    sizes = shard_sizes(urls, cache_dir=str(tmp_path / 'cache'))
    assert sizes == [25, 25, 10]
    stream = ShardStream(urls, None, batch_size=60, num_workers=1, sizes=sizes, seed=1)
    captions = {item[0][1] for item in stream}
    assert len(captions) <= 60 and all(any(c == dataset.utils.pre_caption(x, 30) for it in items for x in it['caption'])
                                       for c in captions)
    bad = subprocess.run([sys.executable, '-m', 'dataset.shards', str(tmp_path / 'none.yaml'), '--out', str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == f'error: config file not found: {tmp_path / "none.yaml"}'


# ---- the scripts on shards ------------------------------------------------------------------------
def test_pretrain_on_library_written_shards_loss_falls(demo_config, tmp_path):
    config = demo_config('Pretrain_shards', **dict(SMALL, batch_size=8, queue_size=32), optimizer={'lr': 5e-4},
                         schedular={'epochs': 8, 'lr': 5e-4})
    out = tmp_path / 'out'
    result = run_script('Pretrain.py', '--config', config, '--output_dir', out, '--device', 'cpu')
    assert_ok(result)
    assert '60 samples per epoch (60 in 6 shards): 7 steps of 8 x 1 processes, 1 loader workers each' in result.stdout
    stats = read_log(out)
    loss = [sum(float(v) for k, v in s.items() if k.startswith('train_loss')) for s in stats]
    assert len(stats) == 8 and loss[-1] < loss[0] - 0.2, stats
    assert all(s['train_skipped_images'] == 0 for s in stats)
    # what each epoch trained, in log.txt: 7 x 8 of the 60, each once; the 4 left out start the next
    assert all((s['train_samples'], s['train_distinct_samples'], s['train_left_out_samples'],
                s['train_shards_cut_short']) == (56, 56, 4, 0) for s in stats), stats


def test_text_assignment_pretraining_on_shards(demo_world, demo_config, tmp_path, capsys):
    shards = os.path.join(demo_world, 'shards', '{000000..000005}.tar')
    config = demo_config('NLVR_pretrain', train_file=None, train_shards=shards, samples_per_epoch=20, batch_size=10,
                         num_workers=1, schedular={'epochs': 1})
    out = tmp_path / 'ta'
    result = run_script('Pretrain_nlvr.py', '--config', config, '--output_dir', out, '--device', 'cpu')
    assert_ok(result)
    assert '20 samples per epoch (60 in 6 shards): 2 steps of 10 x 1 processes' in result.stdout
    assert float(read_log(out)[0]['train_loss']) > 0
    import engine
    import Pretrain_nlvr
    config = demo_config('NLVR_pretrain', train_file=None)
    with pytest.raises(SystemExit) as info:
        engine.launch(Pretrain_nlvr.main, Pretrain_nlvr.get_parser(),
                      ['--config', config, '--output_dir', str(tmp_path / 'bad'), '--device', 'cpu'])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {config}: needs 'train_file' or 'train_shards'"
    assert not (tmp_path / 'bad').exists()


def two_nodes(config, out, log, *extra):
    """Pretrain.py as two one-process "nodes" of a torchrun job on this machine."""
    port = _free_port()
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'ALBEF_SAMPLE_LOG': str(log)}
    processes = [subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1', f'--node_rank={node}',
         '--master_addr=127.0.0.1', f'--master_port={port}', os.path.join(ROOT, 'Pretrain.py'), '--config', config,
         '--output_dir', str(out), '--device', 'cpu', *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-3000:]
    return outputs


def img2dataset_shards(demo_world, folder, sizes):
    """The demo's 60 samples repacked as img2dataset writes them: 00000.tar ... with uneven sizes,
    each with its 00000_stats.json."""
    samples = [s for url in demo_shards(demo_world) for s in wds.tarfile_samples([{'url': url}])]
    os.makedirs(folder, exist_ok=True)
    start = 0
    for shard, size in enumerate(sizes):
        with wds.TarWriter(os.path.join(folder, f'{shard:05d}.tar')) as sink:
            for sample in samples[start:start + size]:
                sink.write({k: v for k, v in sample.items() if k == '__key__' or not k.startswith('__')})
        with open(os.path.join(folder, f'{shard:05d}_stats.json'), 'w') as f:
            json.dump({'count': size, 'successes': size, 'failed_to_download': 0, 'failed_to_resize': 0}, f)
        start += size
    return os.path.join(folder, '*.tar')


def test_two_nodes_see_each_sample_once_and_resume(demo_world, demo_config, tmp_path):
    # one epoch of 3 steps (60 samples in img2dataset shards of uneven sizes, batch 10 on each
    # node), a checkpoint after step 2
    shards = img2dataset_shards(demo_world, str(tmp_path / 'web'), [17, 9, 21, 13])
    config = demo_config('Pretrain_shards', **SMALL, train_shards=shards, save_every_steps=2,
                         schedular={'epochs': 1})
    out, log = tmp_path / 'out', tmp_path / 'samples'
    outputs = two_nodes(config, out, log)
    assert 'process 1 of 2 on cpu (gloo)' in outputs[1]
    hashes = [line for line in outputs[0].splitlines() if line.startswith('final weights sha256 on each process:')]
    assert len(hashes) == 1 and len(set(hashes[0].split(':')[1].split())) == 1, hashes
    assert sorted(os.path.basename(p) for p in glob.glob(str(log / '*.tsv'))) == [
        'samples_rank0_worker0.tsv', 'samples_rank1_worker0.tsv']
    per_rank = [[line.split('\t')[1].strip() for line in open(path)] for path in sorted(glob.glob(str(log / '*.tsv')))]
    seen = per_rank[0] + per_rank[1]
    assert len(per_rank[0]) == len(per_rank[1]) == 30 and len(set(seen)) == 60
    assert {k.rsplit(':', 1)[1] for k in seen} == {f'train_{i:05d}' for i in range(60)}
    stats = read_log(out)[0]  # counted on both nodes, summed over the process group
    assert (stats['train_samples'], stats['train_distinct_samples'], stats['train_left_out_samples']) == (60, 60, 0)

    # resume from the mid-epoch checkpoint (step 2 of 3) alone: the same final weights
    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    shutil.copy(out / 'checkpoint_last.pth', resumed / 'checkpoint_last.pth')
    outputs = two_nodes(config, resumed, tmp_path / 'samples_resumed', '--resume')
    assert 'resumed from' in outputs[0] and 'at epoch 0, step 2' in outputs[0]
    reference = torch.load(out / 'checkpoint_00.pth', map_location='cpu', weights_only=False)['model']
    model = torch.load(resumed / 'checkpoint_00.pth', map_location='cpu', weights_only=False)['model']
    assert all(torch.equal(model[k], reference[k]) for k in reference)
    # the resumed streams delivered only the last step's samples: 10 per node, none seen twice
    resumed_keys = [line.split('\t')[1].strip() for path in glob.glob(str(tmp_path / 'samples_resumed' / '*.tsv'))
                    for line in open(path)]
    assert len(resumed_keys) == 20 and set(resumed_keys) == set(per_rank[0][20:] + per_rank[1][20:])
    # (the epoch's logged loss averages are not compared: every rank resumes with rank 0's meters)
