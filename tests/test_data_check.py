"""python -m dataset.check: every problem reported at once, exit status, --write-clean."""
import json
import os

import pytest
from PIL import Image

from dataset.check import infer_task, load_config, main

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def write_json(path, data):
    with open(path, 'w') as f:
        json.dump(data, f)
    return str(path)


def task_config(name, **data):
    """configs/<name>.yaml with the data keys replaced (dataset.check checks the keys as the scripts do)."""
    return {**load_config(os.path.join(CONFIGS, f'{name}.yaml')), **data}


def write_config(path, config):
    lines = [f'{key}: {json.dumps(value)}' for key, value in config.items()]  # JSON values are YAML
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


@pytest.fixture
def retrieval(tmp_path):
    """A retrieval config whose data has a missing image, an unreadable image and a missing key."""
    root = tmp_path / 'images'
    root.mkdir()
    for name in ('a.jpg', 'b.jpg'):
        Image.new('RGB', (6, 4), (1, 2, 3)).save(root / name, format='PNG')
    (root / 'broken.jpg').write_bytes(b'\x89PNG garbage')
    train = write_json(tmp_path / 'train.json', [
        {'image': 'a.jpg', 'caption': 'ok', 'image_id': 0},
        {'image': 'gone.jpg', 'caption': 'missing image', 'image_id': 1},
        {'image': 'b.jpg', 'caption': 'no image_id'},
        {'image': 'broken.jpg', 'caption': 'unreadable', 'image_id': 2},
        {'image': 'b.jpg', 'caption': 'ok too', 'image_id': 3},
    ])
    test = write_json(tmp_path / 'test.json', [{'image': 'a.jpg', 'caption': ['x', 'y']},
                                               {'image': 'b.jpg', 'caption': ['z']}])
    config = task_config('Retrieval_flickr', train_file=[train], val_file=test, test_file=test, image_root=str(root),
                         image_res=16, k_test=2)
    return {'config': write_config(tmp_path / 'config.yaml', config), 'train': train, 'test': test,
            'root': str(root), 'tmp': tmp_path, 'dict': config}


def test_reports_every_problem_at_once(retrieval, capsys):
    assert main([retrieval['config'], '--no-progress']) == 1
    out = capsys.readouterr().out.splitlines()
    train, root = retrieval['train'], retrieval['root']
    broken = os.path.join(root, 'broken.jpg')
    assert f"{train}: item 2 has no 'image_id' (keys: 'image', 'caption')" in out
    assert f"image not found: {os.path.join(root, 'gone.jpg')} (item 1 of {train})" in out
    unreadable = [line for line in out if line.startswith(f'cannot read image {broken} (item 3 of {train}): ')]
    assert len(unreadable) == 1
    assert out[-1] == ('3 problem(s): 1 bad annotation(s), 1 missing image(s), 1 unreadable image(s); '
                       '3 bad item(s) of 7 in 2 readable annotation file(s)')


def test_clean_data_exits_0(retrieval, capsys):
    clean = write_json(retrieval['tmp'] / 'clean.json', [{'image': 'a.jpg', 'caption': 'ok', 'image_id': 0}])
    config = write_config(retrieval['tmp'] / 'clean.yaml', dict(retrieval['dict'], train_file=[clean]))
    assert main([config, '--task', 're', '--no-progress']) == 0
    lines = capsys.readouterr().out.splitlines()
    # the share of [UNK] word pieces is a report, not a problem (it depends on the config's text_encoder)
    assert len(lines) == 2 and lines[0].startswith('vocabulary: ')
    assert lines[1] == 'OK: 3 items in 2 annotation files, no problems'


def test_unusable_annotation_files_are_reported_with_the_rest(retrieval, capsys):
    malformed = retrieval['tmp'] / 'malformed.json'
    malformed.write_text('[{"image": "a.jpg",}]')
    missing = str(retrieval['tmp'] / 'missing.json')
    config = write_config(retrieval['tmp'] / 'c.yaml', dict(retrieval['dict'], train_file=[str(malformed), missing],
                                                           val_file=retrieval['train']))
    assert main([config, '--no-progress']) == 1
    out = capsys.readouterr().out
    assert f'{malformed}: invalid JSON at line 1, column ' in out
    assert f'annotation file not found: {missing}' in out
    # re_eval_dataset reads the training file too: its captions are strings, not lists
    assert f"{retrieval['train']}: item 0 has 'caption' of type str (expected a list of strings)" in out


def test_write_clean(retrieval, capsys):
    out_dir = retrieval['tmp'] / 'clean'
    assert main([retrieval['config'], '--no-progress', '--write-clean', str(out_dir)]) == 1
    out = capsys.readouterr().out
    assert f"wrote {out_dir / 'train.json'}: 2 of 5 items (3 removed)" in out
    assert f"wrote {out_dir / 'test.json'}: 2 of 2 items (0 removed)" in out
    with open(out_dir / 'train.json') as f:
        assert [item['caption'] for item in json.load(f)] == ['ok', 'ok too']
    # the cleaned files pass
    config = write_config(retrieval['tmp'] / 'cleaned.yaml', dict(
        retrieval['dict'], train_file=[str(out_dir / 'train.json')], val_file=str(out_dir / 'test.json'),
        test_file=str(out_dir / 'test.json')))
    assert main([config, '--no-progress']) == 0


def test_vqa_answer_list_and_roots(tmp_path, capsys):
    root = tmp_path / 'img'
    root.mkdir()
    Image.new('RGB', (4, 4)).save(root / 'a.jpg', format='PNG')
    train = write_json(tmp_path / 'train.json', [
        {'dataset': 'vqa', 'image': 'a.jpg', 'question': 'q', 'answer': ['x']},
        {'dataset': 'vg', 'image': 'a.jpg', 'question': 'q', 'answer': 'y'}])
    test = write_json(tmp_path / 'test.json', [{'dataset': 'vqa', 'image': 'a.jpg', 'question': 'q', 'question_id': 1}])
    config = task_config('VQA', train_file=[train], test_file=[test], answer_list=str(tmp_path / 'answers.json'),
                         vqa_root=str(root), vg_root=str(tmp_path / 'vg'))
    assert main([write_config(tmp_path / 'vqa.yaml', config), '--no-progress']) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"image not found: {tmp_path / 'vg' / 'a.jpg'} (item 1 of {train})",
                       f"annotation file not found: {tmp_path / 'answers.json'}"]


@pytest.mark.parametrize('text, message', [
    (None, 'config file not found: {path}'),
    ('a: [1\nb: 2\n', "{path}:2:2: YAML syntax error: expected ',' or ']', but got ':'"),
    ('a: 1\na: 2\n', '{path}:2:1: YAML syntax error: found duplicate key "a" with value "2" (original value: "1")'),
    (b'a: \xff\n', '{path}: not UTF-8 text (byte 3: invalid start byte)'),
    ('- 1\n', '{path}: expected a mapping of keys to values at the top level'),
    ('', '{path}: expected a mapping of keys to values at the top level'),
])
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, text, message):
    path = tmp_path / 'config.yaml'
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    assert main([str(path)]) == 2
    assert capsys.readouterr().err == f'error: {message.format(path=path)}\n'


@pytest.mark.parametrize('name, task', [
    ('Pretrain', 'pretrain'), ('NLVR_pretrain', 'pretrain_nlvr'), ('Retrieval_coco', 'retrieval'),
    ('Retrieval_flickr', 'retrieval'), ('VQA', 'vqa'), ('VE', 've'), ('NLVR', 'nlvr'), ('Grounding', 'grounding')])
def test_infer_task_of_the_original_configs(name, task):
    assert infer_task(load_config(os.path.join(CONFIGS, f'{name}.yaml'))) == task


def test_infer_task_is_the_closest_schema():
    """The task whose keys the config fits best: a misspelt or missing key does not change it."""
    retrieval = task_config('Retrieval_flickr')
    retrieval['image_rot'] = retrieval.pop('image_root')
    assert infer_task(retrieval) == 'retrieval'
    ve = task_config('VE')
    del ve['batch_size_test']
    assert infer_task(ve) == 've'
    nlvr = {**task_config('NLVR'), 'batch_size_train': 2}
    assert infer_task(nlvr) == 'nlvr'


def test_a_valid_retrieval_config_is_accepted(demo_config, capsys):
    """batch_size_test and the rest of Retrieval.py's keys: the checker and the scripts read one
    schema (tasks.py)."""
    config = demo_config('Retrieval')
    for task in ([], ['--task', 're'], ['--task', 'retrieval']):
        assert main([config, '--no-progress', *task]) == 0
        captured = capsys.readouterr()
        assert captured.err.splitlines()[0] == f'checking the retrieval data of {config}'
        assert captured.out.splitlines()[-1].startswith('OK: ')


@pytest.mark.parametrize('edit, message', [
    (lambda c: c.update(image_rot=c.pop('image_root')), "{path}: unknown key 'image_rot' (did you mean 'image_root'?)"),
    (lambda c: c.update(bert_config='configs/none.json'), '{path}: bert_config: file not found: configs/none.json'),
    (lambda c: c.update(k_test=0), '{path}: k_test: expected a positive integer, got 0'),
])
def test_the_checker_reports_the_config_as_the_script_does(retrieval, tmp_path, capsys, edit, message):
    config = dict(retrieval['dict'])
    edit(config)
    path = write_config(tmp_path / 'edited.yaml', config)
    assert main([path, '--no-progress']) == 2
    assert capsys.readouterr().err == f'error: {message.format(path=path)}\n'
