"""Whatever ends a run ends its process, its DataLoader workers and its other ranks within seconds:
bad input (one line, exit status 2, output_dir untouched), an unexpected exception (its traceback),
Ctrl-C while the script is still importing (one line, status 130). The runs use 2 persistent loader
workers, as the demo configs do; the scripts run as users run them (a subprocess, also under
torchrun and torch.distributed.launch) where the hang was at interpreter exit, and in-process
through engine.launch (as `python Pretrain.py` would) for the other inputs."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

import engine
import Pretrain
import Retrieval
import utils
from configuration import one_line
from conftest import ROOT, descendants, leftovers, run_script

launch_module = sys.modules['engine.launch']  # engine.launch is also the function's name

LIMIT = 60  # seconds from the start of a run to its last process gone
BAD = 3  # the item whose image is bad


def jpeg_bytes(demo_world):
    image = Image.open(os.path.join(demo_world, 'images', 'train_00000.png')).convert('RGB')
    buffer = io.BytesIO()
    image.save(buffer, 'JPEG', quality=90)
    return buffer.getvalue()


# name -> the bad file's bytes, from a good JPEG
BAD_IMAGES = {
    'zero.png': lambda jpeg: b'',
    'cut40.jpg': lambda jpeg: jpeg[:40],
    'cut60.jpg': lambda jpeg: jpeg[:len(jpeg) * 6 // 10],
    'text.jpg': lambda jpeg: b'this is a text file, not a JPEG\n',
}
REASONS = {
    'zero.png': "cannot identify image file '{path}'",
    'cut40.jpg': 'Truncated File Read',
    'cut60.jpg': 'image file is truncated (37 bytes not processed)',
    'text.jpg': "cannot identify image file '{path}'",
}


def bad_image_run(demo_config, demo_world, tmp_path, name, nproc=1):
    """(config, annotation file, bad image): 8 pre-training items, item 3's image `name`; one batch
    of 8 (4 in each of 2 processes), so the bad image is in the first batch and nothing is written."""
    bad = tmp_path / name
    bad.write_bytes(BAD_IMAGES[name](jpeg_bytes(demo_world)))
    with open(os.path.join(demo_world, 'pretrain.json')) as f:
        items = json.load(f)[:8]
    items[BAD]['image'] = str(bad)
    ann = tmp_path / 'ann.json'
    ann.write_text(json.dumps(items))
    config = demo_config('Pretrain', train_file=[str(ann)], batch_size=8 // nproc, queue_size=16, num_workers=2)
    return config, ann, bad


def expected_line(ann, bad):
    reason = REASONS[os.path.basename(bad)].format(path=bad)
    return f'error: cannot read image {bad} (item {BAD} of {ann}): {reason}'


def snapshot(out):
    return {p: (out / p).read_bytes() for p in sorted(os.listdir(out))} if out.is_dir() else out.read_bytes()


def run_to_end(script, *args, nproc=1, launcher='torchrun'):
    """run_script, failing unless the process and every process it started are gone within LIMIT s."""
    before, start = set(descendants()), time.monotonic()
    result = run_script(script, *args, nproc=nproc, launcher=launcher, timeout=LIMIT)
    left = leftovers(before, grace=max(0.0, LIMIT - (time.monotonic() - start)))
    assert not left, f'still running {LIMIT} s after the start: {left}'
    return result


def in_process(main, parser, argv):
    """engine.launch(main) in this process, as `python SCRIPT argv` would run it: its exit status;
    the loader workers it started must be gone when it returns."""
    before = set(descendants())
    with pytest.raises(SystemExit) as exit_info:
        engine.launch(main, parser, [*map(str, argv), '--device', 'cpu'])
    assert not leftovers(before, grace=0), 'loader workers outlived engine.launch'
    return exit_info.value.code


# ---- one process --------------------------------------------------------------------------------
def test_zero_byte_png_ends_the_script(demo_config, demo_world, tmp_path, out):
    # the hang of the issue: the main process waited at exit on its two workers, which ignore SIGTERM
    config, ann, bad = bad_image_run(demo_config, demo_world, tmp_path, 'zero.png')
    before = snapshot(out)
    result = run_to_end('Pretrain.py', '--config', config, '--output_dir', out, '--device', 'cpu')
    assert (result.returncode, result.stderr.splitlines()) == (2, [expected_line(ann, bad)]), result.stderr[-3000:]
    assert snapshot(out) == before


@pytest.mark.parametrize('name', ['cut40.jpg', 'cut60.jpg', 'text.jpg'])
def test_corrupt_image_is_one_line(demo_config, demo_world, tmp_path, out, capsys, name):
    config, ann, bad = bad_image_run(demo_config, demo_world, tmp_path, name)
    before = snapshot(out)
    assert in_process(Pretrain.main, Pretrain.get_parser(), ['--config', config, '--output_dir', out]) == 2
    assert capsys.readouterr().err.splitlines() == [expected_line(ann, bad)]
    assert snapshot(out) == before


def test_unexpected_exception_in_training_ends_the_workers(demo_config, demo_world, tmp_path, out, monkeypatch):
    # not bad input: the exception goes on (its traceback), and the workers are gone all the same
    config = demo_config('Pretrain', batch_size=4, queue_size=16, num_workers=2)

    def fails(*args):
        raise RuntimeError('a bug in the training step')

    monkeypatch.setattr(Pretrain, 'train_step', fails)
    before = set(descendants())
    with pytest.raises(RuntimeError) as error_info:  # its traceback holds the loader, as at a script's exit
        engine.launch(Pretrain.main, Pretrain.get_parser(), ['--config', config, '--output_dir', str(out),
                                                             '--device', 'cpu'])
    assert not leftovers(before, grace=0), 'loader workers outlived engine.launch'
    assert str(error_info.value) == 'a bug in the training step'


def test_queue_size_not_a_multiple_of_the_batch_ends(demo_config, tmp_path, out, capsys):
    # was a traceback, then the hang; a config check may make it one line: either way it ends
    config = demo_config('Pretrain', batch_size=6, queue_size=16, num_workers=2)
    before = set(descendants())
    with pytest.raises((ValueError, SystemExit)) as error_info:  # its traceback holds the loader, as at exit
        engine.launch(Pretrain.main, Pretrain.get_parser(), ['--config', config, '--output_dir', str(out),
                                                             '--device', 'cpu'])
    assert not leftovers(before, grace=0), 'loader workers outlived engine.launch'
    if error_info.type is SystemExit:
        assert error_info.value.code == 2 and capsys.readouterr().err.startswith('error: ')
    else:  # its traceback, exit status 1
        assert str(error_info.value).startswith('queue_size 16 must be a multiple of the global batch size')


def test_evaluation_image_without_captions(demo_config, demo_world, tmp_path, out, capsys):
    with open(os.path.join(demo_world, 'retrieval_val.json')) as f:
        items = json.load(f)
    items[BAD]['caption'] = []
    val = tmp_path / 'val.json'
    val.write_text(json.dumps(items))
    config = demo_config('Retrieval', val_file=str(val), num_workers=2)
    before = snapshot(out)
    assert in_process(Retrieval.main, Retrieval.get_parser(), ['--config', config, '--output_dir', out]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {val}: item {BAD} has an empty 'caption' list (each image needs at least one caption)"]
    assert snapshot(out) == before


def test_output_dir_that_is_a_file(demo_config, tmp_path, capsys):
    config = demo_config('Pretrain', num_workers=2)
    out = tmp_path / 'out.txt'
    out.write_text('not a directory\n')
    line = f'error: --output_dir {out} is a file, not a directory'
    result = run_to_end('Pretrain.py', '--config', config, '--output_dir', out, '--device', 'cpu')  # before torch
    assert (result.returncode, result.stderr.splitlines()) == (2, [line])
    assert in_process(Pretrain.main, Pretrain.get_parser(), ['--config', config, '--output_dir', out]) == 2  # setup
    assert capsys.readouterr().err.splitlines() == [line]
    assert out.read_text() == 'not a directory\n'


# ---- two processes ------------------------------------------------------------------------------
@pytest.mark.parametrize('launcher, name', [('torchrun', 'zero.png'), ('launch', 'cut40.jpg')])
def test_bad_image_ends_every_rank(demo_config, demo_world, tmp_path, out, launcher, name):
    # the rank that reads the bad image reports it; the launcher (torchrun, or the
    # torch.distributed.launch that runs on it) then ends the other rank, or its collective fails
    config, ann, bad = bad_image_run(demo_config, demo_world, tmp_path, name, nproc=2)
    before = snapshot(out)
    result = run_to_end('Pretrain.py', '--config', config, '--output_dir', out, '--device', 'cpu',
                        nproc=2, launcher=launcher)
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    peer = 'error: process {} of 2 stops: another process of the run stopped ('
    assert errors.count(expected_line(ann, bad)) == 1, result.stderr[-3000:]
    assert all(line == expected_line(ann, bad) or line.startswith((peer.format(0), peer.format(1)))
               for line in errors), errors
    assert result.returncode != 0 and 'exitcode  : 2' in result.stderr, result.stderr[-3000:]
    venv = (f'File "{sys.prefix}{os.sep}', f'File "{os.path.realpath(sys.prefix)}{os.sep}')
    ours = [line for line in result.stderr.splitlines()
            if f'File "{ROOT}{os.sep}' in line and not any(v in line for v in venv)]
    assert not ours, result.stderr[-3000:]  # no traceback from the project's code
    assert snapshot(out) == before


# ---- Ctrl-C while the script imports torch ------------------------------------------------------
def test_ctrl_c_while_importing_is_one_line(demo_config, tmp_path):
    config = demo_config('Pretrain')
    before = set(descendants())
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, 'Pretrain.py'), '--config', config,
                                '--output_dir', str(tmp_path / 'out'), '--device', 'cpu'],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # the config is checked (a few ms), torch is importing (seconds)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=LIMIT)
    assert (process.returncode, stderr.splitlines()) == (130, [
        'interrupted; nothing more was written (continue with --resume from the last checkpoint, if any)'])
    assert 'torch' not in stdout and not (tmp_path / 'out').exists()
    assert not leftovers(before)


# ---- one line means one line --------------------------------------------------------------------
def test_one_line_drops_the_module_path():
    # a DataLoader worker's error comes back as its traceback text, ending in the qualified class name
    from dataset.base import ImageError
    wrapped = ImageError('Caught ImageError in DataLoader worker process 0.\nOriginal Traceback (most recent '
                         'call last):\n  File "x.py", line 1, in f\ndataset.base.ImageError: cannot read image a.png '
                         '(item 3 of ann.json): truncated')
    assert one_line(wrapped) == 'cannot read image a.png (item 3 of ann.json): truncated'
    assert one_line(ValueError('ValueError: x: y')) == 'x: y'
    assert one_line(ValueError('KeyError: x')) == 'KeyError: x'  # another class: part of the message
    assert one_line(OSError('cannot\n  read\tit ')) == 'cannot read it'  # one line, whatever the lines
    assert one_line(ValueError()) == 'ValueError' and one_line('a\nb') == 'a b'


def test_print0_says_it_on_the_first_process_and_print_stays_print(monkeypatch, capsys):
    import builtins
    import socket
    original = builtins.print
    with socket.socket() as free:
        free.bind(('127.0.0.1', 0))
        port = free.getsockname()[1]
    for key, value in {'RANK': '0', 'WORLD_SIZE': '1', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)}.items():
        monkeypatch.setenv(key, value)
    assert utils.init_distributed('cpu') == (0, 1, 0)
    try:
        assert builtins.print is original  # joining a process group patches nothing
        utils.print0('said once')
        monkeypatch.setattr(utils.dist, 'get_rank', lambda: 1)  # as process 1 of the group
        utils.print0('not said')
        print('print prints')
    finally:
        utils.dist.destroy_process_group()
    assert capsys.readouterr().out == 'said once\nprint prints\n'


def test_peer_lost_is_told_from_a_bug():
    gloo = RuntimeError('[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:13704. This is '
                        'typically caused by a remote worker crashing.')
    assert launch_module.peer_lost(gloo) == 'Connection closed by peer'
    assert launch_module.peer_lost(RuntimeError('mat1 and mat2 shapes cannot be multiplied')) is None


def test_metrics_are_printed_as_logged(capsys):
    evaluate = engine.split_evaluator({'val': None}, lambda loader: {'img_r10': 72.39999999999999, 'n': 3,
                                                                     'r_mean': 40.63333333333334})
    assert evaluate(0) == {'val_img_r10': 72.4, 'val_n': 3, 'val_r_mean': 40.6333}
    assert capsys.readouterr().out == "val: {'img_r10': 72.4, 'n': 3, 'r_mean': 40.6333}\n"


def test_progress_is_plain_lines_off_a_terminal(capsys, monkeypatch):
    assert isinstance(utils.progress(range(3)), utils.Progress)  # stderr is captured here: not a terminal
    assert list(utils.Progress(range(100), desc='images', unit='img', every=0)) == list(range(100))
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f'images: {n}/100 img ({n}%), 0:00:00' for n in range(10, 101, 10)]
    bar = utils.Progress(total=5, desc='pairs', every=3600)  # a loop shorter than `every`: nothing
    bar.update(5)
    bar.close()
    assert capsys.readouterr().err == ''
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
    from tqdm import tqdm
    bar = utils.progress(range(3), desc='on a terminal')
    assert isinstance(bar, tqdm)
    bar.close()
