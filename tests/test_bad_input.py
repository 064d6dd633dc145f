"""Bad input ends a script with one clear line on stderr, exit status 2, and an output_dir left as
it was. The scripts run in-process through engine.launch, as `python Pretrain.py ...` would."""
import json
import os

import pytest
import torch
from ruamel.yaml import YAML

import configuration
import engine
import Pretrain


def fail(argv, out, capsys):
    """Run Pretrain.py with argv; return its one-line error after checking exit status and out."""
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    with pytest.raises(SystemExit) as exit_info:
        engine.launch(Pretrain.main, Pretrain.get_parser(), [*map(str, argv), '--output_dir', str(out),
                                                             '--device', 'cpu'])
    assert exit_info.value.code == 2
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    return lines[0][len('error: '):]


def write_config(demo_config, tmp_path, edit=None, **overrides):
    path = demo_config('Pretrain', batch_size=8, queue_size=32, num_workers=0, **overrides)
    if edit:
        config = YAML(typ='safe').load(open(path))
        edit(config)
        YAML(typ='safe').dump(config, open(path, 'w'))
    return path


def with_annotations(demo_config, tmp_path, items=None, text=None):
    ann = tmp_path / 'ann.json'
    ann.write_text(text if text is not None else json.dumps(items))
    return write_config(demo_config, tmp_path, train_file=[str(ann)]), str(ann)


def test_config_missing(out, capsys, tmp_path):
    assert fail(['--config', tmp_path / 'nowhere.yaml'], out, capsys) == \
        f'config file not found: {tmp_path / "nowhere.yaml"}'


def test_yaml_syntax_error(out, capsys, tmp_path):
    path = tmp_path / 'broken.yaml'
    path.write_text('image_res: 64\ntrain_file: [a.json, b.json\nbatch_size: 8\n')
    message = fail(['--config', path], out, capsys)
    assert message.startswith(f'{path}:3:') and 'YAML syntax error' in message


def test_required_key_missing(demo_config, out, capsys, tmp_path):
    config = write_config(demo_config, tmp_path, edit=lambda c: c.pop('queue_size'))
    assert fail(['--config', config], out, capsys) == f"{config}: missing required key 'queue_size'"


def test_unknown_key_names_the_closest(demo_config, out, capsys, tmp_path):
    config = write_config(demo_config, tmp_path, edit=lambda c: c.update(batch_szie=c.pop('batch_size')))
    assert fail(['--config', config], out, capsys) == \
        f"{config}: unknown key 'batch_szie' (did you mean 'batch_size'?)"
    config = write_config(demo_config, tmp_path, edit=lambda c: c['schedular'].update(warmup_epoch=1))
    assert fail(['--config', config], out, capsys) == \
        f"{config}: schedular.unknown key 'warmup_epoch' (did you mean 'warmup_epochs'?)"


def test_randaugment_autocontrast_unknown(demo_config, out, capsys, tmp_path):
    config = write_config(demo_config, tmp_path, randaugment_autocontrast='stretch')
    assert fail(['--config', config], out, capsys) == \
        f"{config}: randaugment_autocontrast: expected one of original, pil, got 'stretch'"


def test_annotation_file_missing(demo_config, out, capsys, tmp_path):
    config = write_config(demo_config, tmp_path, train_file=[str(tmp_path / 'none.json')])
    assert fail(['--config', config], out, capsys) == f'annotation file not found: {tmp_path / "none.json"}'


def test_annotation_malformed(demo_config, out, capsys, tmp_path):
    config, ann = with_annotations(demo_config, tmp_path, text='[\n  {"image": "a.png", "caption": "x"},\n]\n')
    assert fail(['--config', config], out, capsys) == \
        f'{ann}: invalid JSON at line 3, column 1: Expecting value'


def test_annotation_item_lacks_key(demo_config, demo_world, out, capsys, tmp_path):
    image = os.path.join(demo_world, 'images', 'train_00000.png')
    config, ann = with_annotations(demo_config, tmp_path, [{'image': image, 'caption': 'a'}, {'image': image}])
    assert fail(['--config', config], out, capsys) == f"{ann}: item 1 has no 'caption' (keys: 'image')"


def test_image_missing(demo_config, demo_world, out, capsys, tmp_path):
    image = os.path.join(demo_world, 'images', 'train_00000.png')
    config, ann = with_annotations(demo_config, tmp_path, [{'image': image, 'caption': 'a'},
                                                           {'image': str(tmp_path / 'gone.png'), 'caption': 'b'}])
    assert fail(['--config', config], out, capsys) == f'image not found: {tmp_path / "gone.png"} (item 1 of {ann})'


def bad_image_world(demo_world, tmp_path, n=16):
    """n good items, then a missing and an unreadable image."""
    good = os.path.join(demo_world, 'images', 'train_00000.png')
    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'\x89PNG this is not an image')
    items = [{'image': good, 'caption': 'a red circle'} for _ in range(n)]
    return items + [{'image': str(bad), 'caption': 'b'}], str(bad)


def test_image_unreadable(demo_config, demo_world, out, capsys, tmp_path):
    items, bad = bad_image_world(demo_world, tmp_path, n=7)  # the bad one is in the first batch of 8
    config, ann = with_annotations(demo_config, tmp_path, items)
    message = fail(['--config', config], out, capsys)
    assert message.startswith(f'cannot read image {bad} (item 7 of {ann}): '), message


def test_skip_bad_images(demo_config, demo_world, tmp_path, caplog):
    items, bad = bad_image_world(demo_world, tmp_path, n=15)
    items.append({'image': str(tmp_path / 'gone.png'), 'caption': 'c'})
    ann = tmp_path / 'ann.json'
    ann.write_text(json.dumps(items))
    config = write_config(demo_config, tmp_path, train_file=[str(ann)], skip_bad_images=True,
                          schedular={'epochs': 1})
    out = tmp_path / 'skip'
    engine.launch(Pretrain.main, Pretrain.get_parser(), ['--config', config, '--output_dir', str(out),
                                                         '--device', 'cpu'])
    assert 'checkpoint_00.pth' in os.listdir(out)
    log = caplog.text
    assert '1 of 17 items have a missing image' in log
    stats = json.loads(open(out / 'log.txt').readline())
    assert stats['train_skipped_images'] >= 1  # the unreadable one, met while loading


def test_checkpoint_missing(demo_config, out, capsys, tmp_path):
    config = write_config(demo_config, tmp_path)
    assert fail(['--config', config, '--checkpoint', tmp_path / 'no.pth'], out, capsys) == \
        f'checkpoint not found: {tmp_path / "no.pth"}'


def test_checkpoint_of_another_model(demo_config, out, capsys, tmp_path):
    from models.model_ve import ALBEF
    from models.tokenization_bert import BertTokenizer
    config = write_config(demo_config, tmp_path)
    cfg = dict(configuration.load_yaml(config), distill=False)
    ve = ALBEF(config=cfg, tokenizer=BertTokenizer.from_pretrained(cfg['text_encoder']))
    torch.save({'model': ve.state_dict()}, tmp_path / 've.pth')
    message = fail(['--config', config, '--checkpoint', tmp_path / 've.pth'], out, capsys)
    assert message.startswith(f'{tmp_path / "ve.pth"} does not fit models.model_pretrain.ALBEF (no conversion): '
                              f'missing: temp, text_encoder.bert.embeddings.position_ids'), message


def test_resume_with_nothing_to_resume(demo_config, tmp_path, capsys):
    """--resume into a folder that does not exist: one line, exit status 2, and no folder made; into
    an empty folder: the same, and the folder left empty."""
    config = write_config(demo_config, tmp_path)
    missing, empty = tmp_path / 'missing', tmp_path / 'empty'
    empty.mkdir()
    for out in (missing, empty):
        with pytest.raises(SystemExit) as exit_info:
            engine.launch(Pretrain.main, Pretrain.get_parser(), ['--config', config, '--output_dir', str(out),
                                                                 '--device', 'cpu', '--resume'])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines() == [f'error: --resume: no checkpoint to resume from in {out}']
    assert not missing.exists()
    assert os.listdir(empty) == []
