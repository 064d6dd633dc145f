"""The web demo (`python -m demo`): its three tabs through gradio_client, checked against models.load
called directly; bad input; the folder's embedding cache; and the Look tab in headless Chromium.

The app runs as users start it, in a subprocess on 127.0.0.1, with tiny random-weight retrieval and
VQA checkpoints made here (the tiny model sizes of tests/conftest.py, the demo world's vocabulary)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from conftest import ROOT, TINY_BERT_CONFIG, TINY_CONFIG, build_model

gradio_client = pytest.importorskip('gradio_client')
CAPTION = 'the red circle on the left'


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def checkpoints(demo_world, tmp_path_factory):
    """Tiny random-weight checkpoints in the training scripts' format: {'model', 'config', 'epoch'}."""
    from models.tokenization_bert import BertTokenizer
    out = tmp_path_factory.mktemp('webdemo_checkpoints')
    tokenizer = BertTokenizer.from_pretrained(os.path.join(demo_world, 'text_encoder'))
    with open(TINY_BERT_CONFIG) as f:
        bert = {**json.load(f), 'vocab_size': len(tokenizer)}
    (out / 'bert.json').write_text(json.dumps(bert))
    config = {**TINY_CONFIG, 'bert_config': str(out / 'bert.json'), 'init_text_encoder': False,
              'text_encoder': os.path.join(demo_world, 'text_encoder'), 'eos': '[SEP]', 'k_test': 4,
              'answer_list': os.path.join(demo_world, 'answer_list.json')}
    paths = {}
    for task in ('retrieval', 'vqa'):
        torch.manual_seed(0)
        model = build_model(task, tokenizer, config)
        paths[task] = str(out / f'{task}.pth')
        torch.save({'model': model.state_dict(), 'config': config, 'epoch': 0}, paths[task])
    return paths


@pytest.fixture(scope='module')
def folder(demo_world, tmp_path_factory):
    """Twelve demo scenes, a file that only looks like a PNG, and a text file (not indexed)."""
    folder = tmp_path_factory.mktemp('webdemo_photos')
    images = sorted(n for n in os.listdir(os.path.join(demo_world, 'images')) if n.endswith('.png'))
    for name in images[-12:]:
        shutil.copy(os.path.join(demo_world, 'images', name), folder / name)
    (folder / 'broken.png').write_bytes(b'not a png at all')
    (folder / 'notes.txt').write_text('not an image')
    return str(folder)


@pytest.fixture(scope='module')
def direct(checkpoints):
    """The same checkpoints through models.load in this process, for the known answers."""
    from models.api import load
    return {task: load(path, device='cpu') for task, path in checkpoints.items()}


@pytest.fixture(scope='module')
def server(checkpoints, folder, tmp_path_factory):
    """`python -m demo` on a free port of 127.0.0.1, with a 1 MB upload limit."""
    port = _free_port()
    log = tmp_path_factory.mktemp('webdemo_server') / 'server.log'
    command = [sys.executable, '-m', 'demo', '--checkpoint', checkpoints['retrieval'], '--vqa_checkpoint',
               checkpoints['vqa'], '--images', folder, '--port', str(port), '--max_file_size', '1mb', '--device', 'cpu']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'GRADIO_ANALYTICS_ENABLED': 'False'}
    with open(log, 'w') as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}/'
    try:
        deadline = time.time() + 600
        while True:
            if process.poll() is not None:
                pytest.fail(f'the demo exited with {process.returncode}:\n{log.read_text()[-3000:]}')
            if f'ALBEF demo: open {url}' in log.read_text():  # printed once the server listens
                with urllib.request.urlopen(url, timeout=10) as response:
                    assert response.status == 200
                break
            if time.time() > deadline:
                pytest.fail(f'the demo did not answer on {url} within 600 s:\n{log.read_text()[-3000:]}')
            time.sleep(0.5)
        yield {'url': url, 'log': log, 'process': process}
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope='module')
def client(server):
    return gradio_client.Client(server['url'], verbose=False)


def _image(folder, i=0):
    return os.path.join(folder, sorted(n for n in os.listdir(folder) if n.endswith('.png') and n != 'broken.png')[i])


def _app_error(call):
    """The one line that the page shows for a gr.Error (gradio_client raises it as AppError)."""
    with pytest.raises(gradio_client.exceptions.AppError) as error:
        call()
    return str(error.value)


# ---- the server ----------------------------------------------------------------------------------
def test_serves_on_localhost_and_says_what_it_loaded(server, checkpoints, folder):
    lines = server['log'].read_text().splitlines()
    assert lines[:2] == [f'ALBEF demo: Look and Search: {checkpoints["retrieval"]} (retrieval); '
                         f'Ask: {checkpoints["vqa"]} (vqa); Search: {folder} (13 image files)',
                         f'ALBEF demo: open {server["url"]} (this machine only)']


def test_upload_size_is_limited(server):
    import httpx
    big, small = os.urandom(1_200_000), os.urandom(1000)
    url = server['url'] + 'gradio_api/upload'
    assert httpx.post(url, files={'files': ('small.bin', small)}).status_code == 200
    response = httpx.post(url, files={'files': ('big.bin', big)})
    assert response.status_code == 413, response.text


# ---- the three tabs against models.load ----------------------------------------------------------
def test_look_gives_the_api_numbers_the_caption_and_one_panel_per_word(client, direct, folder):
    from demo.app import block_choices
    model = direct['retrieval']
    image = _image(folder)
    layers, default = block_choices(model)
    assert (layers, default) == ([2], 2)  # the tiny model fuses at layers 2 and 3; the last one has no word maps
    for block in layers:
        itm, itc, panels = client.predict(gradio_client.handle_file(image), CAPTION, block, api_name='/look')
        cam = model.gradcam(image, CAPTION, block_num=block)
        assert itm == pytest.approx(float(model.itm(image, CAPTION)[0]), abs=1e-5)
        assert itc == pytest.approx(float(model.similarity(image, CAPTION)[0, 0]), abs=1e-5)
        assert [p['caption'] for p in panels] == ['image', 'whole caption'] + cam.words
        assert cam.words == ['the', 'red', 'circle', 'on', 'the', 'left']
    from PIL import Image
    with Image.open(panels[1]['image']) as panel:
        assert panel.size == (256, 256)  # the 64-pixel scene, enlarged for the page


def test_search_ranks_by_itc_and_reranks_by_itm(client, direct, folder):
    model = direct['retrieval']
    names = sorted(n for n in os.listdir(folder) if n.endswith('.png') and n != 'broken.png')
    paths = [os.path.join(folder, n) for n in names]
    itc = (model.embed_images(paths) @ model.embed_texts([CAPTION]).T)[:, 0]

    gallery, table, status = client.predict(CAPTION, 5, False, 16, api_name='/search')
    expected = itc.topk(5).indices.tolist()
    assert [row[1] for row in table['data']] == [names[i] for i in expected]
    assert [row[2] for row in table['data']] == pytest.approx([float(itc[i]) for i in expected], abs=1e-5)
    assert [row[0] for row in table['data']] == [1, 2, 3, 4, 5]
    assert [g['caption'] for g in gallery] == [f'#{r} ITC {float(itc[i]):.3f}' for r, i in enumerate(expected, 1)]
    assert status.startswith(f'12 images in {folder}; skipped 1 unreadable file (broken.png); ')

    _, table, status = client.predict(CAPTION, 3, True, 8, api_name='/search')
    shortlist = itc.topk(8).indices.tolist()
    itm = model.itm([paths[i] for i in shortlist], [CAPTION] * 8)
    best = sorted(range(8), key=lambda j: -float(itm[j]))[:3]
    assert [row[1] for row in table['data']] == [names[shortlist[j]] for j in best]
    assert [row[3] for row in table['data']] == pytest.approx([float(itm[j]) for j in best], abs=1e-5)
    assert status.endswith('; 0 embedded now, 12 from the cache')  # the first search embedded them
    assert os.listdir(os.path.join(folder, '.albef_embeddings'))


def test_ask_gives_the_api_answers(client, direct, folder):
    image, question = _image(folder, 1), 'what color is the circle?'
    label = client.predict(gradio_client.handle_file(image), question, 3, api_name='/ask')
    expected = direct['vqa'].answer(image, question, k=3)[0]
    assert [(c['label'], c['confidence']) for c in label['confidences']] == \
        [(a, pytest.approx(p, abs=1e-5)) for a, p in expected]


def test_classify_gives_the_api_top_k_and_reranks_by_itm(client, direct, folder):
    image, classes, templates = _image(folder, 2), ['red circle', 'blue square', 'green triangle', 'white circle'], \
        ['a {}', 'there is a {}']
    label, table = client.predict(gradio_client.handle_file(image), ', '.join(classes), '\n'.join(templates), 3, 0,
                                  api_name='/classify')
    expected = direct['retrieval'].classify(image, classes, templates, k=3)[0]
    assert [(c['label'], c['confidence']) for c in label['confidences']] == \
        [(name, pytest.approx(p, abs=1e-5)) for name, p in zip(expected.classes, expected.probs)]
    assert [row[:2] for row in table['data']] == [[1, expected.classes[0]], [2, expected.classes[1]],
                                                  [3, expected.classes[2]]]
    assert [row[3] for row in table['data']] == pytest.approx(expected.similarities, abs=1e-5)
    label, table = client.predict(gradio_client.handle_file(image), ' red circle,blue square , green triangle, '
                                  'white circle,', '\n'.join(templates), 4, 2, api_name='/classify')
    reranked = direct['retrieval'].classify(image, classes, templates, k=4, rerank=2)[0]
    assert [(c['label'], c['confidence']) for c in label['confidences']] == \
        [(name, pytest.approx(p, abs=1e-5)) for name, p in zip(reranked.classes[:2], reranked.itm[:2])]
    assert [row[1] for row in table['data']] == reranked.classes
    assert [row[4] for row in table['data']][:2] == pytest.approx(reranked.itm[:2], abs=1e-5)
    assert [row[4] for row in table['data']][2:] == [None, None]
    assert _app_error(lambda: client.predict(gradio_client.handle_file(image), 'cat', '', 3, 0,
                                             api_name='/classify')) \
        == 'type at least two class names separated by commas, e.g. "red circle, blue square"'
    assert _app_error(lambda: client.predict(gradio_client.handle_file(image), 'cat, dog', 'a photo', 3, 0,
                                             api_name='/classify')) \
        == 'template \'a photo\' must hold the class name\'s place "{}" exactly once'


# ---- bad input -------------------------------------------------------------------------------------
def test_bad_input_gets_one_line_in_the_page(client, folder, tmp_path):
    fake = tmp_path / 'holiday.png'
    fake.write_text('this is text, not a picture')
    image = gradio_client.handle_file(_image(folder))
    assert _app_error(lambda: client.predict(gradio_client.handle_file(str(fake)), CAPTION, 2, api_name='/look')) \
        == 'holiday.png is not an image that Pillow can read: upload a JPEG, PNG, WebP, ... file'
    assert _app_error(lambda: client.predict(image, '   ', 2, api_name='/look')) \
        == 'the caption is empty: type a caption first'
    assert _app_error(lambda: client.predict(image, '?!', 2, api_name='/look')) \
        == "the caption '?!' has no words left after lowercasing and removing punctuation"
    assert _app_error(lambda: client.predict('', 5, False, 16, api_name='/search')) \
        == 'the text is empty: type what to search for first'
    assert _app_error(lambda: client.predict(image, '', 3, api_name='/ask')) \
        == 'the question is empty: type a question first'


def test_checkpoints_of_another_task_say_what_they_need(checkpoints, folder):
    import gradio as gr

    from demo import cli
    from demo.app import Handlers
    args = cli.get_parser().parse_args(['--checkpoint', checkpoints['vqa'], '--vqa_checkpoint',
                                        checkpoints['retrieval'], '--images', folder])
    models, line = cli.resolve(args)
    look_note = (f"{checkpoints['vqa']} is a 'vqa' checkpoint; Look and Search need the ITC and ITM heads of a "
                 f"retrieval or pre-training checkpoint (e.g. mscoco.pth, ALBEF.pth): pass one with --checkpoint")
    ask_note = (f"{checkpoints['retrieval']} is a 'retrieval' checkpoint; answering questions needs a VQA checkpoint "
                f"(vqa.pth): pass one with --vqa_checkpoint")
    assert line == f'{look_note}; {ask_note}; Search: {folder} (13 image files)'
    handlers = Handlers(models)
    from PIL import Image
    with Image.open(_image(folder)) as f:
        image = f.convert('RGB')
    for call, note in ((lambda: handlers.look(image, CAPTION, 8), look_note),
                       (lambda: handlers.search(CAPTION, 5, False, 16), look_note),
                       (lambda: handlers.ask(image, 'what color is the circle?', 3), ask_note)):
        with pytest.raises(gr.Error) as error:
            call()
        assert error.value.message == note


def test_a_vqa_checkpoint_without_answer_list_asks_for_one(checkpoints, tmp_path):
    from demo import cli
    saved = torch.load(checkpoints['vqa'], weights_only=True)
    del saved['config']['answer_list']
    bare = str(tmp_path / 'vqa_bare.pth')
    torch.save(saved, bare)
    args = cli.get_parser().parse_args(['--checkpoint', checkpoints['retrieval'], '--vqa_checkpoint', bare])
    models, line = cli.resolve(args)
    assert models.vqa_note == (f'{bare} names no list of candidate answers: pass --answer_list answer_list.json '
                               f'(the answers it was trained to rank)')
    assert line.split('; ')[1] == models.vqa_note


def _run_demo(*args, cwd=ROOT):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
    return subprocess.run([sys.executable, '-m', 'demo', *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # generous: a loaded 2-core machine takes a minute to import torch


def test_command_line_bad_input_exits_2_with_one_line(tmp_path, checkpoints):
    result = _run_demo('--checkpoint', str(tmp_path / 'missing.pth'))
    assert (result.returncode, result.stderr) == (2, f'demo: --checkpoint {tmp_path / "missing.pth"}: '
                                                     f'no such file or directory\n')
    result = _run_demo('--checkpoint', checkpoints['retrieval'], '--images', str(tmp_path / 'nowhere'))
    assert (result.returncode, result.stderr) == (2, f'demo: --images {tmp_path / "nowhere"}: not a directory\n')
    result = _run_demo(cwd=tmp_path)  # no demo world here
    assert result.returncode == 2
    assert result.stderr == ('demo: no --checkpoint given and no demo checkpoint under output/demo/: make one with '
                             'the demo command of README.md (python -m dataset.toy --out data/demo, then Pretrain.py '
                             'and Retrieval.py), or pass --checkpoint CKPT\n')
    png = tmp_path / 'picture.png'
    shutil.copy(os.path.join(os.path.dirname(checkpoints['retrieval']), 'bert.json'), png)
    result = _run_demo('--checkpoint', str(png))
    assert result.returncode == 2 and result.stderr.count('\n') == 1 and str(png) in result.stderr, result.stderr


def test_without_arguments_it_serves_the_demo_world(checkpoints, demo_world, tmp_path, monkeypatch):
    """output/demo/ as the README's commands leave it: the newest retrieval-capable checkpoint serves
    Look and Search, the VQA one Ask, data/demo/images (PNGs only) Search."""
    from demo import cli
    for name, source in (('pretrain/checkpoint_00.pth', 'retrieval'), ('retrieval/checkpoint_last.pth', 'retrieval'),
                         ('retrieval/checkpoint_best.pth', 'retrieval'), ('vqa/checkpoint_best.pth', 'vqa')):
        os.makedirs(tmp_path / 'output' / 'demo' / os.path.dirname(name), exist_ok=True)
        shutil.copy(checkpoints[source], tmp_path / 'output' / 'demo' / name)
        time.sleep(0.01)
    os.makedirs(tmp_path / 'data')
    os.symlink(demo_world, tmp_path / 'data' / 'demo')
    monkeypatch.chdir(tmp_path)
    models, line = cli.resolve(cli.get_parser().parse_args([]))
    assert line == ('Look and Search: output/demo/retrieval/checkpoint_best.pth (retrieval); '
                    'Ask: output/demo/vqa/checkpoint_best.pth (vqa); Search: data/demo/images (80 image files)')
    assert len(models.examples) == 4 and models.examples[0][1]
    assert len({image for image, _ in models.vqa_examples}) == 4 and models.vqa_examples[0][1].endswith('?')

    shutil.rmtree(tmp_path / 'output' / 'demo' / 'vqa')
    models, line = cli.resolve(cli.get_parser().parse_args([]))
    assert line.split('; ')[1] == ('Ask is off: answering questions needs a VQA checkpoint: make one with python '
                                   'VQA.py --config configs/demo/VQA.yaml --checkpoint '
                                   'output/demo/pretrain/checkpoint_29.pth --output_dir output/demo/vqa --device cpu')


def test_launch_binds_localhost_never_shares_and_limits_uploads(checkpoints, folder, monkeypatch):
    import gradio as gr

    from demo import cli
    calls = []
    monkeypatch.setattr(gr.Blocks, 'launch', lambda self, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(gr.Blocks, 'block_thread', lambda self: None)
    assert cli.main(['--checkpoint', checkpoints['retrieval'], '--images', folder]) == 0
    assert cli.main(['--checkpoint', checkpoints['retrieval'], '--share', '--max_file_size', '2mb']) == 0
    assert [(c['server_name'], c['server_port'], c['share'], c['max_file_size']) for c in calls] == \
        [('127.0.0.1', 7860, False, '10mb'), ('127.0.0.1', 7860, True, '2mb')]


# ---- the cache -------------------------------------------------------------------------------------
def test_folder_embeddings_are_cached_by_checkpoint_and_file_times(direct, checkpoints, folder, tmp_path):
    from demo.index import build_index
    photos = tmp_path / 'photos'
    shutil.copytree(folder, photos, ignore=shutil.ignore_patterns('.albef_embeddings'))
    model = direct['retrieval']
    seen = []
    first = build_index(model, checkpoints['retrieval'], str(photos), progress=lambda done, total: seen.append(done))
    assert (len(first.names), first.embedded, first.unreadable) == (12, 12, ['broken.png'])
    assert seen == [0, 13]  # files looked at, the unreadable one included
    assert torch.allclose(first.embeddings, model.embed_images([str(photos / n) for n in first.names]), atol=1e-6)

    again = build_index(model, checkpoints['retrieval'], str(photos))
    assert again.embedded == 0 and torch.equal(again.embeddings, first.embeddings)

    touched = photos / first.names[3]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10 ** 9))
    (photos / first.names[5]).unlink()
    shutil.copy(photos / first.names[0], photos / 'new.png')
    changed = build_index(model, checkpoints['retrieval'], str(photos))
    assert changed.embedded == 2 and len(changed.names) == 12 and 'new.png' in changed.names
    assert changed.summary() == (f'12 images in {photos}; skipped 1 unreadable file (broken.png); '
                                 f'2 embedded now, 10 from the cache')

    other = tmp_path / 'other.pth'
    shutil.copy(checkpoints['retrieval'], other)
    assert build_index(model, str(other), str(photos)).embedded == 12  # another checkpoint: its own cache file
    assert len(os.listdir(photos / '.albef_embeddings')) == 2


# ---- the page in a real browser --------------------------------------------------------------------
def _chromium():
    for name in ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable'):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_look_in_headless_chromium(server, direct, folder, tmp_path):
    playwright = pytest.importorskip('playwright.sync_api')
    executable = _chromium()
    if executable is None:
        pytest.skip('no Chromium on this machine (CI installs Debian\'s chromium package: apt-get install chromium)')
    image = _image(folder, 2)
    expected_itm = float(direct['retrieval'].itm(image, CAPTION)[0])
    words = direct['retrieval'].gradcam(image, CAPTION, block_num=2).words
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=['--no-sandbox'])
        try:
            page = browser.new_page(viewport={'width': 1280, 'height': 900})
            page.goto(server['url'], wait_until='networkidle')
            page.locator('#look-image input[type=file]').set_input_files(image)
            page.locator('#look-caption textarea').fill(CAPTION)
            page.locator('#look-run').click()
            page.locator('#look-panels img').nth(len(words) + 1).wait_for(timeout=30_000)
            page.wait_for_function("document.querySelector('#look-itm input').value !== ''", timeout=30_000)
            assert float(page.locator('#look-itm input').input_value()) == pytest.approx(expected_itm, abs=1e-5)
            assert page.locator('#look-panels img').count() == 2 + len(words)
            screenshot = tmp_path / 'look.png'
            page.screenshot(path=str(screenshot), full_page=True)
            print(f'screenshot: {screenshot}')
            assert screenshot.stat().st_size > 10_000

            page.locator('#look-caption textarea').fill('')  # bad input: the message appears in the page
            page.locator('#look-run').click()
            page.get_by_text('the caption is empty: type a caption first').first.wait_for(timeout=30_000)
        finally:
            browser.close()


def test_grad_cam_block_defaults_to_8_for_albef_size_models(demo_world, tmp_path):
    """ALBEF's BERT: 12 layers fused from 6; the selector offers 6-10 (layer 11's word maps are zero)."""
    from types import SimpleNamespace

    from demo.app import block_choices
    from models.tokenization_bert import BertTokenizer
    tokenizer = BertTokenizer.from_pretrained(os.path.join(demo_world, 'text_encoder'))
    with open(TINY_BERT_CONFIG) as f:
        bert = {**json.load(f), 'vocab_size': len(tokenizer), 'num_hidden_layers': 12, 'fusion_layer': 6}
    (tmp_path / 'bert.json').write_text(json.dumps(bert))
    model = build_model('retrieval', tokenizer, {**TINY_CONFIG, 'bert_config': str(tmp_path / 'bert.json')})
    assert block_choices(SimpleNamespace(model=model)) == ([6, 7, 8, 9, 10], 8)
