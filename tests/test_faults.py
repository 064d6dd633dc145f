"""The faults a new user meets after the demo: a re-run into an output_dir, a tokenizer that does not
fit the model, captions the vocabulary cannot read, too few items, 16-bit, truncated and oversized images,
a full disk, keep_checkpoints. Each ends with one line naming the file, key, item or limit, exit
status 2, and the files already in output_dir unchanged (Ctrl-C and pre-emption:
tests/test_signals.py)."""
import argparse
import errno
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import configuration
import engine
import tasks
import engine.run
import Pretrain
from conftest import ROOT
from dataset import check
from dataset.base import DataError, ImageError, load_rgb
from dataset.loaders import check_batch_count
from engine.checkpointing import Checkpointer, DiskFullError, atomic_save
from test_bad_input import fail, write_config


def run_pretrain(argv):
    """Pretrain.py in this process, as `python Pretrain.py ARGV` runs it; returns the exit status."""
    try:
        engine.launch(Pretrain.main, Pretrain.get_parser(), [*map(str, argv), '--device', 'cpu'])
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def snapshot(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def items_of(demo_world, n, caption='a red circle'):
    image = os.path.join(demo_world, 'images', 'train_00000.png')
    return [{'image': image, 'caption': caption} for _ in range(n)]


def annotations(tmp_path, items, name='ann.json'):
    path = tmp_path / name
    path.write_text(json.dumps(items))
    return str(path)


# ---- 1. re-running into an output_dir --------------------------------------------------------------
@pytest.fixture
def earlier_run(tmp_path):
    out = tmp_path / 'earlier'
    out.mkdir()
    for name, text in (('checkpoint_00.pth', 'weights 0'), ('checkpoint_05.pth', 'weights 5'),
                       ('log.txt', '{"epoch": 0}\n'), ('config.yaml', 'earlier: run\n')):
        (out / name).write_text(text)
    return out


def test_rerun_into_output_dir_with_checkpoints_is_refused(demo_config, tmp_path, earlier_run, capsys):
    config = write_config(demo_config, tmp_path)
    assert fail(['--config', config], earlier_run, capsys) == (
        f'{earlier_run} holds checkpoints of an earlier run (checkpoint_00.pth, checkpoint_05.pth): continue it '
        f'with --resume, start again with --overwrite, or choose another --output_dir')


def test_overwrite_says_what_it_replaces_and_starts_again(demo_config, tmp_path, earlier_run, capsys):
    config = write_config(demo_config, tmp_path, schedular={'epochs': 1})
    assert run_pretrain(['--config', config, '--output_dir', earlier_run, '--overwrite']) == 0
    out = capsys.readouterr().out
    assert (f'--overwrite: this run replaces checkpoint_00.pth, checkpoint_05.pth, log.txt, config.yaml in '
            f'{earlier_run} (removed when it writes its first file)') in out
    assert (f'--overwrite: removed checkpoint_00.pth, checkpoint_05.pth, log.txt, config.yaml from {earlier_run}'
            in out)
    assert sorted(os.listdir(earlier_run)) == ['checkpoint_00.pth', 'config.yaml', 'log.txt', 'tensorboard']
    assert [json.loads(line)['epoch'] for line in open(earlier_run / 'log.txt')] == [0]  # this run's only


def test_overwrite_with_bad_input_leaves_the_earlier_run(demo_config, demo_world, tmp_path, earlier_run, capsys):
    """The data is found too small after start-up (the loader): nothing of the earlier run is removed yet."""
    ann = annotations(tmp_path, items_of(demo_world, 5))
    config = write_config(demo_config, tmp_path, train_file=[ann])
    assert fail(['--config', config, '--overwrite'], earlier_run, capsys).startswith('5 training items in ')


def test_evaluate_and_resume_may_use_an_output_dir_with_checkpoints(earlier_run):
    before = snapshot(earlier_run)
    for flags in ({'evaluate': True, 'resume': False}, {'evaluate': False, 'resume': True}):
        assert engine.run.check_output_dir(argparse.Namespace(output_dir=str(earlier_run), **flags)) == []
    assert snapshot(earlier_run) == before
    run = engine.Run(args=argparse.Namespace(evaluate=True), config={'evaluated': 'here'}, output_dir=str(earlier_run))
    run.write_config()  # the evaluation's config goes beside the training run's
    assert snapshot(earlier_run) == {**before, 'config_evaluate.yaml': b'{evaluated: here}\n'}


# ---- 2. tokenizer and model that do not fit --------------------------------------------------------
def test_tokenizer_larger_than_the_embedding_table(demo_config, demo_world, tmp_path, capsys):
    vocab = tmp_path / 'big_vocab'
    vocab.mkdir()
    words = open(os.path.join(demo_world, 'text_encoder', 'vocab.txt')).read().split()
    words += [f'word{i}' for i in range(100 - len(words))]
    (vocab / 'vocab.txt').write_text('\n'.join(words) + '\n')
    config = write_config(demo_config, tmp_path)
    bert_config = configuration.load_yaml(config)['bert_config']
    out = tmp_path / 'out'
    out.mkdir()
    assert fail(['--config', config, '--text_encoder', vocab], out, capsys) == (
        f'the tokenizer of {vocab} has 100 word pieces but {bert_config} sets vocab_size: 66 (the rows of the '
        f'word-embedding table): set vocab_size: 100 in {bert_config}, or point text_encoder at the vocabulary '
        f'the config was made for')


def test_checkpoint_embeddings_of_another_vocabulary_size(demo_config, tmp_path, capsys):
    from models.model_pretrain import ALBEF
    from models.tokenization_bert import BertTokenizer
    config = write_config(demo_config, tmp_path)
    cfg = configuration.load_yaml(config)
    bert = json.load(open(cfg['bert_config']))
    bigger = tmp_path / 'config_bert_80.json'
    bigger.write_text(json.dumps({**bert, 'vocab_size': 80}))
    model = ALBEF(config={**cfg, 'bert_config': str(bigger)}, text_encoder=None, init_deit=False,
                  tokenizer=BertTokenizer.from_pretrained(cfg['text_encoder']))
    torch.save({'model': model.state_dict()}, tmp_path / 'other_vocab.pth')
    out = tmp_path / 'out'
    out.mkdir()
    assert fail(['--config', config, '--checkpoint', tmp_path / 'other_vocab.pth'], out, capsys) == (
        f'{tmp_path / "other_vocab.pth"}: its word embeddings (text_encoder.bert.embeddings.word_embeddings.weight) '
        f'have 80 rows but the configured vocabulary has 66 (vocab_size of the bert_config): use the bert_config '
        f'and text_encoder the checkpoint was trained with')


# ---- 3. captions the vocabulary cannot read ---------------------------------------------------------
def test_unk_rate_warns_once_with_examples(demo_config, demo_world, tmp_path, capsys):
    items = items_of(demo_world, 12) + items_of(demo_world, 4, caption='a golden retriever catches a frisbee')
    config = write_config(demo_config, tmp_path, train_file=[annotations(tmp_path, items)])
    empty = tmp_path / 'empty'
    assert run_pretrain(['--config', config, '--output_dir', empty, '--resume']) == 2  # stops after the check
    vocab = os.path.join(demo_world, 'text_encoder', 'vocab.txt')
    example = "'a golden retriever catches a frisbee'"
    assert capsys.readouterr().err.splitlines() == [  # 26.7%
        # 'a golden retriever catches a frisbee': 6 pieces, 4 of them [UNK]; 'a red circle': 3 known pieces
        f'warning: {16 / (4 * 6 + 12 * 3):.1%} of the word pieces of 16 sampled training texts are [UNK] in the '
        f'vocabulary {vocab} '
        f'(above 5%; e.g. {example}; {example}; {example}): use a text_encoder whose vocabulary covers these texts',
        f'error: --resume: no checkpoint to resume from in {empty}']


def test_dataset_check_reports_the_unk_rate(demo_config, demo_world, capsys):
    assert check.main([demo_config('Pretrain'), '--no-progress']) == 0
    vocab = os.path.join(demo_world, 'text_encoder', 'vocab.txt')
    assert f'vocabulary: 0.0% of the word pieces of 60 sampled training texts are [UNK] in the vocabulary {vocab}' \
        in capsys.readouterr().out.splitlines()


# ---- 4. too few items -------------------------------------------------------------------------------
def test_fewer_items_than_one_batch(demo_config, demo_world, tmp_path, capsys):
    ann = annotations(tmp_path, items_of(demo_world, 5))
    config = write_config(demo_config, tmp_path, train_file=[ann])
    out = tmp_path / 'out'
    out.mkdir()
    assert fail(['--config', config], out, capsys) == (
        f'5 training items in {ann} are too few for one batch of 8 in each of 1 process(es) (at least 8 needed): '
        f'lower batch_size in {config} or add items')


def test_items_left_out_by_drop_last_are_reported(demo_config, demo_world, tmp_path, capsys):
    config = write_config(demo_config, tmp_path, train_file=[annotations(tmp_path, items_of(demo_world, 17))])
    assert run_pretrain(['--config', config, '--output_dir', tmp_path / 'empty', '--resume']) == 2
    assert capsys.readouterr().out.count('drop_last: 1 of 17 training items are left out of each epoch '
                                         '(2 batches of 8 in each of 1 process(es))') == 1


def test_batch_count_with_several_processes():
    with pytest.raises(DataError, match=r'^31 training items in a.json are too few for one batch of 8 in '
                                                 r'each of 4 process\(es\) \(at least 32 needed\)'):
        check_batch_count(31, 8, 4, ['a.json'], 'c.yaml')
    check_batch_count(29, 4, 4)  # 8 per process (padded to 32): two batches each, none left out


# ---- 5. images that decode wrongly ------------------------------------------------------------------
def sixteen_bit_png(path):
    """A 16-bit greyscale gradient from 1000 to 5000 (a 12-bit camera's range)."""
    values = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    Image.fromarray(values).save(path)  # uint16: mode I;16
    return values


def truncated_jpeg(demo_world, path):
    Image.open(os.path.join(demo_world, 'images', 'train_00000.png')).convert('RGB').save(path, quality=95)
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])


def test_16_bit_image_is_scaled_by_its_range(tmp_path):
    sixteen_bit_png(tmp_path / 'deep.png')
    assert Image.open(tmp_path / 'deep.png').mode == 'I;16'
    image = load_rgb(str(tmp_path / 'deep.png'), 'item 0 of a.json')
    assert image.mode == 'RGB'
    expected = np.rint((np.array([[1000, 2000], [3000, 5000]]) - 1000) * 255 / 4000).astype(np.uint8)
    assert expected.tolist() == [[0, 64], [128, 255]]
    assert (np.asarray(image) == expected[..., None]).all()


def bomb_png(path, width=20000, height=20000):
    """A PNG of about 100 bytes that declares width x height pixels (1.2 GB as RGB); its data is cut short."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b''))
    return str(path)


def test_decompression_bomb_is_refused_unless_the_config_raises_the_limit(demo_world, tmp_path, monkeypatch):
    from dataset import create_dataset
    from dataset.base import DEFAULT_MAX_IMAGE_PIXELS, probe_image
    from models.loaded import to_pil
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS // 2  # importing the datasets left Pillow's guard
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', Image.MAX_IMAGE_PIXELS)  # as it is now, after this test
    bomb = bomb_png(tmp_path / 'bomb.png')
    with pytest.raises(Image.DecompressionBombError):  # models.load and the demo: Pillow's own guard
        to_pil(bomb)
    too_large = rf'^cannot read image {bomb} \(item 0 of a.json\): more than max_image_pixels = {DEFAULT_MAX_IMAGE_PIXELS}'
    with pytest.raises(ImageError, match=too_large):
        load_rgb(bomb, 'item 0 of a.json')
    assert probe_image(bomb, 'item 0 of a.json')[0] == 'bad_image'  # dataset.check
    good = items_of(demo_world, 1)[0]
    ann = annotations(tmp_path, [{'image': bomb, 'caption': 'a red circle'}, good])
    config = {'train_file': [ann], 'image_res': 32}
    with pytest.raises(ImageError, match=rf'^cannot read image {bomb} \(item 0 of .*ann.json\): more than '
                                         rf'max_image_pixels = {DEFAULT_MAX_IMAGE_PIXELS} pixels'):
        create_dataset('pretrain', config)[0]
    skipping = create_dataset('pretrain', {**config, 'skip_bad_images': True})
    assert skipping[0][1] == 'a red circle' and skipping.num_skipped == 1  # a bad image: skipped and counted
    with pytest.raises(ImageError) as raised:  # no limit: read as far as its data goes
        create_dataset('pretrain', {**config, 'max_image_pixels': None})[0]
    assert 'max_image_pixels' not in str(raised.value) and Image.MAX_IMAGE_PIXELS is None
    small = create_dataset('pretrain', {**config, 'max_image_pixels': 10})  # the limit is the config's
    with pytest.raises(ImageError, match=r'\d+ x \d+, more than max_image_pixels = 10 pixels'):
        small[1]
    check = tasks.COMMON_KEYS['max_image_pixels']  # the config key: a positive integer, or null for no limit
    assert check(10) and check(None) and not check(0) and not check(1.5) and not check(True)


def test_truncated_image_is_unreadable(demo_config, demo_world, tmp_path, capsys):
    bad = tmp_path / 'cut.jpg'
    truncated_jpeg(demo_world, bad)
    with pytest.raises(ImageError, match=rf'^cannot read image {bad} \(item 3 of a.json\): image file is truncated'):
        load_rgb(str(bad), 'item 3 of a.json')
    items = items_of(demo_world, 7) + [{'image': str(bad), 'caption': 'a red circle'}]
    ann = annotations(tmp_path, items)
    config = write_config(demo_config, tmp_path, train_file=[ann])
    out = tmp_path / 'out'
    out.mkdir()
    message = fail(['--config', config], out, capsys)
    assert message.startswith(f'cannot read image {bad} (item 7 of {ann}): image file is truncated'), message


def test_dataset_check_decodes_every_image(demo_config, demo_world, tmp_path, capsys):
    sixteen_bit_png(tmp_path / 'deep.png')
    truncated_jpeg(demo_world, tmp_path / 'cut.jpg')
    items = items_of(demo_world, 2) + [{'image': str(tmp_path / 'deep.png'), 'caption': 'a red circle'},
                                       {'image': str(tmp_path / 'cut.jpg'), 'caption': 'a red circle'}]
    ann = annotations(tmp_path, items)
    assert check.main([write_config(demo_config, tmp_path, train_file=[ann]), '--no-progress']) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f'cannot read image {tmp_path / "cut.jpg"} (item 3 of {ann}): image file is '
                               f'truncated') for line in lines), lines
    assert f'note: image {tmp_path / "deep.png"} (item 2 of {ann}) has mode I;16: scaled to 8 bits by its range ' \
           f'of values' in lines
    assert lines[-1] == '1 problem(s): 1 unreadable image(s); 1 bad item(s) of 4 in 1 readable annotation file(s)'


# ---- 8. smaller cases -------------------------------------------------------------------------------
def test_caption_list_elements_are_validated(demo_config, demo_world, tmp_path, capsys):
    items = items_of(demo_world, 3)
    items[2]['caption'] = ['a red circle', None]
    ann = annotations(tmp_path, items)
    config = write_config(demo_config, tmp_path, train_file=[ann])
    out = tmp_path / 'out'
    out.mkdir()
    assert fail(['--config', config], out, capsys) == \
        f"{ann}: item 2 has null at position 1 of its 'caption' list (expected strings)"


def test_dataset_check_validates_config_keys_as_the_scripts(demo_config, tmp_path, capsys):
    config = write_config(demo_config, tmp_path, edit=lambda c: c.update(batch_szie=c.pop('batch_size')))
    assert check.main([config, '--no-progress']) == 2
    assert capsys.readouterr().err.strip() == f"error: {config}: unknown key 'batch_szie' (did you mean 'batch_size'?)"
    config = write_config(demo_config, tmp_path, edit=lambda c: c.pop('queue_size'))
    assert check.main([config, '--no-progress']) == 2
    assert capsys.readouterr().err.strip() == f"error: {config}: missing required key 'queue_size'"


# ---- 7. a full disk ---------------------------------------------------------------------------------
def test_full_disk_keeps_the_last_good_checkpoint(demo_config, tmp_path, capsys, monkeypatch):
    config = write_config(demo_config, tmp_path, schedular={'epochs': 3})
    out = tmp_path / 'out'
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):  # the second checkpoint meets a full disk half-way
        calls.append(f.name)
        if len(calls) == 2:
            f.write(b'\0' * 4096)
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', save)
    assert run_pretrain(['--config', config, '--output_dir', out]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f'error: no space left on device writing {out / "checkpoint_01.pth"}; the last good checkpoint is '
        f'{out / "checkpoint_00.pth"}']
    assert sorted(os.listdir(out)) == ['checkpoint_00.pth', 'config.yaml', 'log.txt', 'tensorboard']  # no .tmp file left
    assert [json.loads(line)['epoch'] for line in open(out / 'log.txt')] == [0]  # epoch 1 is not logged


def test_disk_full_from_a_wrapped_error(tmp_path, monkeypatch):
    def save(obj, f, *args, **kwargs):  # torch.save reports a failed write as a RuntimeError
        try:
            raise OSError(errno.ENOSPC, 'No space left on device')
        except OSError as error:
            raise RuntimeError('[enforce fail at inline_container.cc:820] . PytorchStreamWriter failed writing '
                               'file data/3: file write failed') from error

    monkeypatch.setattr(torch, 'save', save)
    with pytest.raises(DiskFullError) as error:
        atomic_save({}, str(tmp_path / 'c.pth'))
    assert error.value.strerror == f'no space left on device writing {tmp_path / "c.pth"}'
    assert os.listdir(tmp_path) == []


# ---- 10. keep_checkpoints ---------------------------------------------------------------------------
def test_keep_checkpoints(tmp_path):
    for name in ('checkpoint_00.pth', 'checkpoint_01.pth', 'checkpoint_02.pth', 'checkpoint_10.pth',
                 'checkpoint_best.pth', 'checkpoint_last.pth', 'log.txt'):
        (tmp_path / name).write_text(name)
    Checkpointer(str(tmp_path), None, None, None, {}).prune(2)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint_02.pth', 'checkpoint_10.pth', 'checkpoint_best.pth',
                                            'checkpoint_last.pth', 'log.txt']
    Checkpointer(str(tmp_path), None, None, None, {}).prune(None)  # the default keeps all
    assert len(os.listdir(tmp_path)) == 5


def test_keep_checkpoints_must_be_positive(demo_config, tmp_path, capsys):
    config = write_config(demo_config, tmp_path, keep_checkpoints=0)
    out = tmp_path / 'out'
    out.mkdir()
    assert fail(['--config', config], out, capsys) == f'{config}: keep_checkpoints: expected a positive integer, or null, got 0'


# ---- 9. threads ---------------------------------------------------------------------------------------
def test_default_threads_share_the_cores():
    cpus = os.cpu_count()
    assert engine.run.default_threads(num_workers=2, cores=16, local_processes=1, load=cpus - 16) == 14
    assert engine.run.default_threads(num_workers=2, cores=16, local_processes=4, load=cpus - 16) == 2
    assert engine.run.default_threads(num_workers=4, cores=2, local_processes=1, load=0) == 1
    # a busy machine: only the idle cores (cores less the load average) are shared out
    assert engine.run.default_threads(num_workers=0, cores=cpus, local_processes=1, load=cpus - 1) == 1
    assert engine.run.default_threads(num_workers=0, cores=cpus, local_processes=1, load=cpus + 12) == 1
    assert engine.run.default_threads(num_workers=0, cores=len(os.sched_getaffinity(0)), local_processes=1, load=0) \
        == min(len(os.sched_getaffinity(0)), cpus)


# ---- 8. config mistakes before the slow imports ----------------------------------------------------
PROBE = """import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
except SystemExit as exit_info:
    print(exit_info.code, 'torch' in sys.modules)
"""


@pytest.mark.parametrize('script', ['Pretrain.py', 'Retrieval.py', 'VQA.py', 'VE.py', 'NLVR.py', 'Grounding.py',
                                    'Pretrain_nlvr.py'])
def test_config_mistakes_are_reported_before_torch_is_imported(script, tmp_path):
    config = tmp_path / 'config.yaml'
    config.write_text('batch_szie: 8\n')
    result = subprocess.run([sys.executable, '-c', PROBE, os.path.join(ROOT, script), '--config', str(config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ['2', 'False'], result.stdout + result.stderr
    error = result.stderr.strip()
    assert error.startswith(f"error: {config}: unknown key 'batch_szie'"), error


def test_precheck_paths(demo_config, tmp_path, earlier_run, capsys):
    import configuration
    import tasks
    script = tasks.PRETRAIN

    def refused(argv):
        with pytest.raises(SystemExit) as exit_info:
            configuration.precheck('__main__', script, argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err.strip()

    config = write_config(demo_config, tmp_path, train_file=[str(tmp_path / 'none.json')])
    assert refused(['--config', config]) == f'error: annotation file not found: {tmp_path / "none.json"}'
    config = write_config(demo_config, tmp_path)  # a good config from here on
    assert refused(['--config', config, '--checkpoint', str(tmp_path / 'no.pth')]) == \
        f'error: checkpoint not found: {tmp_path / "no.pth"}'
    assert refused(['--config', config, '--output_dir', str(earlier_run)]) == (
        f'error: {earlier_run} holds checkpoints of an earlier run (checkpoint_00.pth, checkpoint_05.pth): continue '
        f'it with --resume, start again with --overwrite, or choose another --output_dir')
    configuration.precheck('__main__', script, ['--config', config, '--output_dir', str(earlier_run), '--resume'])
    configuration.precheck('Pretrain', script, ['--config', str(tmp_path / 'nowhere.yaml')])  # imported: no check
