"""Released files by name (models/fetch.py): downloaded once into the cache from a local HTTP server
on 127.0.0.1 ($ALBEF_BASE_URL), resumed with a Range request after a dropped connection, renamed
only when complete; unknown names and no network get one line. Nothing here reaches the internet."""
import http.server
import os
import re
import socket
import threading

import pytest
import torch

import configuration
import tasks
import engine
import models
import Retrieval
from conftest import ROOT
from models import fetch


class Server:
    """Serves `files` {name: bytes} with Range support; a name in `drops` is cut after half its bytes
    on its first request (the connection closes). `requests` records (path, Range header)."""

    def __init__(self):
        self.files, self.drops, self.requests = {}, set(), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit('/', 1)[-1]
                server.requests.append((name, self.headers.get('Range')))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                if self.headers.get('Range'):
                    start = int(self.headers['Range'].split('=')[1].split('-')[0])
                    self.send_response(206)
                    self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
                else:
                    self.send_response(200)
                self.send_header('Content-Length', str(len(data) - start))
                self.end_headers()
                if name in server.drops:
                    server.drops.discard(name)
                    self.wfile.write(data[start:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/ALBEF/'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope='module')
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture
def cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv('ALBEF_BASE_URL', server.url)
    monkeypatch.setenv('ALBEF_CACHE', str(tmp_path / 'cache'))
    server.requests.clear()
    return tmp_path / 'cache'


def test_names_and_urls(monkeypatch):
    assert fetch.names() == ['ALBEF', 'ALBEF_4M', 'mscoco', 'flickr30k', 'vqa', 'refcoco', 'pretrain_model_nlvr',
                             'data', 'json_pretrain']
    monkeypatch.delenv('ALBEF_BASE_URL', raising=False)
    assert fetch.url_of('ALBEF_4M') == 'https://storage.googleapis.com/sfr-pcl-data-research/ALBEF/ALBEF_4M.pth'
    assert fetch.url_of('data') == 'https://storage.googleapis.com/sfr-pcl-data-research/ALBEF/data.tar.gz'
    assert fetch.url_of('json_pretrain').endswith('/ALBEF/json_pretrain.zip')


def test_downloads_once_into_the_cache(server, cache, capsys):
    server.files['data.tar.gz'] = os.urandom(3000)
    assert fetch.main(['data']) == 0
    path = cache / 'data.tar.gz'
    assert capsys.readouterr().out == f'{path}\n'
    assert path.read_bytes() == server.files['data.tar.gz'] and server.requests == [('data.tar.gz', None)]
    assert fetch.main(['data', '--quiet']) == 0 and len(server.requests) == 1  # cached: no second request
    assert sorted(os.listdir(cache)) == ['data.tar.gz', 'data.tar.gz.lock']


def test_a_dropped_connection_resumes_where_it_stopped(server, cache):
    data = os.urandom(5 * fetch.CHUNK // 2 + 7)
    server.files['ALBEF_4M.pth'], server.drops = data, {'ALBEF_4M.pth'}
    path = fetch.fetch('ALBEF_4M', progress=False)
    assert server.requests == [('ALBEF_4M.pth', None), ('ALBEF_4M.pth', f'bytes={len(data) // 2}-')]
    with open(path, 'rb') as f:
        assert f.read() == data
    assert not os.path.exists(path + '.partial')


def test_an_interrupted_download_keeps_its_partial_file_and_the_next_run_resumes(server, cache, monkeypatch,
                                                                                 capsys):
    data = os.urandom(10_000)
    server.files['vqa.pth'], server.drops = data, {'vqa.pth'}
    monkeypatch.setattr(fetch, 'RETRIES', 0)
    assert fetch.main(['vqa', '--quiet']) == 2
    path, partial = cache / 'vqa.pth', cache / 'vqa.pth.partial'
    assert capsys.readouterr().err == (f'error: cannot download {server.url}vqa.pth (the connection dropped at 5000 of 10000 bytes): '
                                       f'download it by hand to {path}; {partial} (5000 bytes) is kept and the '
                                       f'same command resumes it\n')
    assert not path.exists() and partial.read_bytes() == data[:5000]  # renamed only when complete
    assert fetch.main(['vqa', '--quiet']) == 0
    assert server.requests[-1] == ('vqa.pth', 'bytes=5000-') and path.read_bytes() == data


def test_unknown_names_list_the_known_ones(cache, capsys):
    assert fetch.main(['ALBEF_14M']) == 2
    assert capsys.readouterr().err == ("error: 'ALBEF_14M' is neither a file nor a released ALBEF name; the names "
                                       "are ALBEF, ALBEF_4M, mscoco, flickr30k, vqa, refcoco, pretrain_model_nlvr, "
                                       "data, json_pretrain (python -m models.fetch --list)\n")
    with pytest.raises(fetch.FetchError, match=r"^'json_pretrain' is the pre-training annotation files "
                                               r"\(json_pretrain\.zip\), not a model; python -m models\.fetch "
                                               r"json_pretrain downloads it$"):
        models.load('json_pretrain')
    with pytest.raises(fetch.FetchError, match="'refcocoplus' is neither a file nor a released ALBEF name"):
        models.load('refcocoplus')
    assert fetch.main(['--list']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9
    assert lines[0].startswith('ALBEF                pre-trained on 14M images: not cached (http')


def test_no_network_names_the_url_and_where_to_put_the_file(cache, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]  # closed once the block ends: the connection is refused
    monkeypatch.setenv('ALBEF_BASE_URL', f'http://127.0.0.1:{port}/x')
    assert fetch.main(['refcoco', '--quiet']) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf'error: cannot download http://127\.0\.0\.1:{port}/x/refcoco\.pth \(\[Errno \d+\] Connection '
                        rf'refused\): download it by hand to {re.escape(str(cache / "refcoco.pth"))}\n', err), err


def test_an_existing_file_wins_over_the_name(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'mscoco').write_bytes(b'x')
    assert fetch.resolve_checkpoint('mscoco') == 'mscoco'
    assert fetch.resolve_checkpoint('elsewhere/mscoco.pth') == 'elsewhere/mscoco.pth'  # a path: left as it is


@pytest.fixture(scope='module')
def served_retrieval(server, tmp_path_factory):
    """A demo-sized retrieval checkpoint (random weights, the scripts' format) served as mscoco.pth."""
    from test_api import save_task_checkpoint
    from dataset import toy
    from configuration import load_yaml
    from conftest import _relocate
    base = tmp_path_factory.mktemp('fetch')
    world = str(base / 'data')
    toy.main(['--out', world, '--scale', '0.05'])
    config = {k: _relocate(v, world) for k, v in load_yaml(os.path.join(ROOT, 'configs', 'demo',
                                                                         'Pretrain.yaml')).items()}
    config['distill'] = True
    path = save_task_checkpoint({'base': base, 'config': config}, 'retrieval')
    with open(path, 'rb') as f:
        server.files['mscoco.pth'] = f.read()
    return path


def test_models_load_and_scripts_take_a_name(served_retrieval, server, cache, demo_config, tmp_path, capsys):
    loaded = models.load('mscoco', device='cpu')
    direct = models.load(served_retrieval, device='cpu')
    assert loaded.task == 'retrieval' and os.path.isfile(cache / 'mscoco.pth')
    for (name, a), b in zip(loaded.model.state_dict().items(), direct.model.state_dict().values()):
        assert torch.equal(a, b), name
    capsys.readouterr()  # the progress bar
    config = demo_config('Retrieval', num_workers=0)
    configuration.precheck('__main__', tasks.RETRIEVAL, ['--config', config, '--checkpoint',
                                                                            'mscoco'])  # a name passes
    with pytest.raises(SystemExit) as exit_info:
        configuration.precheck('__main__', tasks.RETRIEVAL, ['--config', config, '--checkpoint',
                                                                                'mscoco.pth'])
    assert exit_info.value.code == 2 and capsys.readouterr().err == 'error: checkpoint not found: mscoco.pth\n'
    for name, expected in (('mscoco', 0), ('coco', 2)):
        with pytest.raises(SystemExit) as exit_info:
            engine.launch(Retrieval.main, Retrieval.get_parser(),
                          ['--config', config, '--checkpoint', name, '--evaluate', '--device', 'cpu',
                           '--output_dir', str(tmp_path / name), '--log_to', 'none'])
            raise SystemExit(0)
        assert exit_info.value.code == expected
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: 'coco' is neither a file nor a released ALBEF name; the names are ALBEF, ALBEF_4M, mscoco, "
        "flickr30k, vqa, refcoco, pretrain_model_nlvr, data, json_pretrain (python -m models.fetch --list)")
    assert [r for r in server.requests if r[0] == 'mscoco.pth'] == [('mscoco.pth', None)]  # downloaded once
