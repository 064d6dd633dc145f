"""dataset/: what a bad annotation file or image does (one line naming the file, item and key; a
DataError, which is a ValueError), and skip_bad_images (docs/DESIGN.md, "Data"). The dataset
classes, text preprocessing and loaders are in tests/test_dataset.py.

All data is written to tmp_path: tiny PIL images and JSON annotation files.
"""
import json
import logging
import os

import pytest

import dataset
from dataset import (DataError, grounding_dataset, nlvr_dataset, pretrain_dataset, re_eval_dataset,
                     re_train_dataset, ve_dataset, vqa_dataset)
from test_dataset import image_folder, write_json


@pytest.fixture
def images(tmp_path):
    return image_folder(tmp_path)


# ---- errors ------------------------------------------------------------------------------------

def test_missing_annotation_file(tmp_path, images):
    path = str(tmp_path / 'nope.json')
    with pytest.raises(DataError) as info:
        re_train_dataset([path], None, images)
    assert str(info.value) == f'annotation file not found: {path}'


def test_malformed_json_names_line_and_column(tmp_path, images):
    text = '[\n  {"image": "a.jpg",\n   "caption": "x",,\n}]'
    path = tmp_path / 'bad.json'
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as parsed:
        json.loads(text)
    with pytest.raises(DataError) as info:
        re_train_dataset(str(path), None, images)
    e = parsed.value
    assert str(info.value) == f'{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}'
    assert e.lineno == 3


def test_not_a_list(tmp_path, images):
    path = write_json(tmp_path / 'dict.json', {'image': 'a.jpg'})
    with pytest.raises(DataError) as info:
        re_eval_dataset(path, None, images)
    assert str(info.value) == f'{path}: expected a JSON list, got an object'


def test_item_not_an_object(tmp_path, images):
    path = write_json(tmp_path / 'items.json', [{'image': 'a.jpg', 'caption': ['x']}, 'b.jpg', 3])
    with pytest.raises(DataError) as info:
        re_eval_dataset(path, None, images)
    assert str(info.value) == f'{path}: item 1 is not an object (got a string)'


def test_missing_key_lists_the_keys_present(tmp_path, images):
    good = write_json(tmp_path / 'good.json', [{'image': 'a.jpg', 'caption': 'x', 'image_id': 1}])
    path = write_json(tmp_path / 'keys.json', [
        {'image': 'a.jpg', 'caption': 'x', 'image_id': 1},
        {'image': 'a.jpg', 'caption': 'x', 'image_id': 1},
        {'image': 'b.jpg', 'image_id': 2, 'captions': 'typo'},
    ])
    with pytest.raises(DataError) as info:
        re_train_dataset([good, path], None, images)
    assert str(info.value) == f"{path}: item 2 has no 'caption' (keys: 'image', 'image_id', 'captions')"


@pytest.mark.parametrize('make, item, message', [
    (lambda ann, root: ve_dataset(ann, None, root), {'image': 'a', 'sentence': 's', 'label': 'yes'},
     "has label 'yes' (expected 'entailment', 'neutral' or 'contradiction')"),
    (lambda ann, root: vqa_dataset(ann, None, root, root), {'dataset': 'coco', 'image': 'a.jpg', 'question': 'q',
                                                            'answer': ['a']},
     "has dataset 'coco' (expected 'vqa' or 'vg')"),
    (lambda ann, root: vqa_dataset(ann, None, root, root, split='test', answer_list=''),
     {'dataset': 'vqa', 'image': 'a.jpg', 'question': 'q', 'answer': ['a']},
     "has no 'question_id' (keys: 'dataset', 'image', 'question', 'answer')"),
    (lambda ann, root: nlvr_dataset(ann, None, root), {'images': ['a.jpg'], 'sentence': 's', 'label': 'True'},
     "has 'images' ['a.jpg'] (expected a list of 2 paths)"),
    (lambda ann, root: re_eval_dataset(ann, None, root), {'image': 'a.jpg', 'caption': 'one string'},
     "has 'caption' of type str (expected a list of strings)"),
    (lambda ann, root: grounding_dataset(ann, None, root, mode='test'), {'image': 'a.jpg', 'text': 't'},
     "has no 'ref_id' (keys: 'image', 'text')"),
])
def test_item_value_errors(tmp_path, images, make, item, message):
    path = write_json(tmp_path / 'ann.json', [item])
    with pytest.raises(DataError) as info:
        make(path, images)
    assert str(info.value) == f'{path}: item 0 {message}'


def test_missing_image_at_construction(tmp_path, images):
    path = write_json(tmp_path / 'ann.json', [{'image': 'a.jpg', 'caption': 'x', 'image_id': 1},
                                              {'image': 'gone.jpg', 'caption': 'y', 'image_id': 2}])
    with pytest.raises(DataError) as info:
        re_train_dataset(path, None, images)
    assert str(info.value) == f"image not found: {os.path.join(images, 'gone.jpg')} (item 1 of {path})"


def test_missing_image_at_load_time(tmp_path, images):
    path = write_json(tmp_path / 'ann.json', [{'images': ['a.jpg', 'gone.jpg'], 'sentence': 'x', 'label': 'True'}])
    ds = nlvr_dataset(path, None, images, check_images=False)
    with pytest.raises(DataError) as info:
        ds[0]
    assert str(info.value) == f"image not found: {os.path.join(images, 'gone.jpg')} (item 0 of {path})"


def test_unreadable_image(tmp_path, images):
    broken = os.path.join(images, 'broken.jpg')
    path = write_json(tmp_path / 'ann.json', [{'image': broken, 'caption': 'x'}])
    ds = pretrain_dataset(path, None)  # the file exists, so construction passes
    with pytest.raises(DataError) as info:
        ds[0]
    assert str(info.value) == f"cannot read image {broken} (item 0 of {path}): cannot identify image file '{broken}'"
    assert '\n' not in str(info.value)


def test_errors_are_value_errors():
    assert issubclass(DataError, ValueError) and dataset.DataError is dataset.base.DataError


# ---- skip_bad_images ---------------------------------------------------------------------------

def test_skip_bad_images_replaces_with_next_readable_item(tmp_path, images, caplog):
    path = write_json(tmp_path / 'ann.json', [
        {'image': 'a.jpg', 'caption': 'zero', 'image_id': 0},
        {'image': 'gone.jpg', 'caption': 'one', 'image_id': 1},
        {'image': 'broken.jpg', 'caption': 'two', 'image_id': 2},
        {'image': 'b.jpg', 'caption': 'three', 'image_id': 3},
        {'image': 'gone.jpg', 'caption': 'four', 'image_id': 4},
    ])
    with caplog.at_level(logging.WARNING, logger='dataset.base'):
        ds = re_train_dataset(path, None, images, skip_bad_images=True)
    assert ds.num_missing_images == 2
    assert '2 of 5 items have a missing image' in caplog.text
    assert ds.num_skipped == 0
    assert ds[1][1:] == ('three', 3)  # 1 missing, 2 unreadable -> 3
    assert ds.num_skipped == 2
    assert ds[4][1:] == ('zero', 0)   # wraps around
    assert ds.num_skipped == 3
    assert ds[3][1:] == ('three', 3) and ds.num_skipped == 3


def test_skip_bad_images_with_no_readable_image(tmp_path, images):
    path = write_json(tmp_path / 'ann.json', [{'image': 'gone.jpg', 'caption': 'x', 'image_id': 0}])
    ds = re_train_dataset(path, None, images, skip_bad_images=True)
    with pytest.raises(DataError, match='no readable image in'):
        ds[0]


def test_skip_bad_images_does_not_hide_other_errors(tmp_path, images):
    path = write_json(tmp_path / 'ann.json', [{'image': 'a.jpg', 'caption': 'x', 'image_id': 0}])
    ds = re_train_dataset(path, lambda image: 1 / 0, images, skip_bad_images=True)
    with pytest.raises(ZeroDivisionError):
        ds[0]
