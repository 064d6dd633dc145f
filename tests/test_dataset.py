"""dataset/: text preprocessing, dataset classes, errors, loaders and evaluation helpers
(docs/DESIGN.md, "Data").

All data is written to tmp_path: tiny PIL images and JSON annotation files.
"""
import json
import os

import pytest
import torch
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler

import dataset
from dataset import (DataError, create_dataset, create_loader, create_sampler, eval_loader, grounding_dataset,
                     nlvr_dataset, train_loader, pretrain_dataset, re_eval_dataset, re_train_dataset, ve_dataset, vqa_collate_fn, vqa_dataset)
from dataset.utils import collect_result, computeIoU, pre_caption, pre_question


def make_image(path, size=(8, 6), color=(200, 30, 90)):
    """A tiny one-colour image, PNG-encoded whatever the extension, so the colour is exact."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', size, color).save(path, format='PNG')
    return str(path)


def write_json(path, data):
    with open(path, 'w') as f:
        json.dump(data, f)
    return str(path)


def image_folder(tmp_path):
    """Root folder with a.jpg, b.jpg, c.png (each a different colour) and broken.jpg (not an image)."""
    root = tmp_path / 'images'
    make_image(root / 'a.jpg', color=(255, 0, 0))
    make_image(root / 'b.jpg', color=(0, 255, 0))
    make_image(root / 'c.png', color=(0, 0, 255))
    (root / 'broken.jpg').write_bytes(b'not an image')
    return str(root)


@pytest.fixture
def images(tmp_path):
    return image_folder(tmp_path)


def color_of(image):
    return image.getpixel((0, 0))


# ---- pre_caption / pre_question ----------------------------------------------------------------

@pytest.mark.parametrize('text, max_words, expected', [
    ("A  Man's dog-walker/ride <person>!\n", 30, 'a mans dog walker ride person'),
    ('  Hello,   World!  ', 30, 'hello world'),
    ('trail \n', 30, 'trail'),
    ('a  b c', 2, 'a b'),
    ('The <PERSON> (left); "quoted" *x* #1: ~ok?', 30, 'the person left quoted x 1 ok'),
    ('tab\tinside', 30, 'tab\tinside'),  # a lone tab is not collapsed
    ('one two three four', 3, 'one two three'),
    ('x' + ' word' * 40, 30, ' '.join(['x'] + ['word'] * 29)),
])
def test_pre_caption(text, max_words, expected):
    assert pre_caption(text, max_words) == expected


@pytest.mark.parametrize('text, max_words, expected', [
    ('  Hello,   World!  ', 30, '  hello   world'),
    ('trail \n', 30, 'trail \n'),  # the newline stops rstrip(' ')
    ('a  b c', 2, 'a '),  # the empty string between two spaces is a word
    ("What's the man's <person>-job?", 30, 'whats the mans <person> job'),
    ('Is it red ?  ', 30, 'is it red'),
])
def test_pre_question(text, max_words, expected):
    assert pre_question(text, max_words) == expected


def test_default_max_words_is_50():
    text = ' '.join(['w'] * 60)
    assert len(pre_caption(text).split(' ')) == 50
    assert len(pre_question(text).split(' ')) == 50


# ---- dataset classes ---------------------------------------------------------------------------

def test_pretrain_dataset(tmp_path, images):
    ann = write_json(tmp_path / 'pre.json', [
        {'image': os.path.join(images, 'a.jpg'), 'caption': 'A red square!'},
        {'image': os.path.join(images, 'b.jpg'), 'caption': ['first one', 'second one']},
    ])
    ds = pretrain_dataset([ann], None)
    assert len(ds) == 2
    image, caption = ds[0]
    assert color_of(image) == (255, 0, 0) and image.mode == 'RGB' and caption == 'a red square'
    assert {ds[1][1] for _ in range(40)} == {'first one', 'second one'}  # random.choice per call
    with_transform = pretrain_dataset(ann, dataset.build_transform('pretrain', 16))
    tensor, _ = with_transform[1]
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32


def test_re_train_dataset_img_idx_by_first_appearance(tmp_path, images):
    ann = write_json(tmp_path / 'train.json', [
        {'image': 'b.jpg', 'caption': 'B one', 'image_id': 'img-9'},
        {'image': 'a.jpg', 'caption': 'A one', 'image_id': 'img-2'},
        {'image': 'b.jpg', 'caption': 'B two', 'image_id': 'img-9'},
        {'image': 'c.png', 'caption': 'C one', 'image_id': 'img-5'},
    ])
    ds = re_train_dataset([ann], None, images)
    assert [ds[i][2] for i in range(4)] == [0, 1, 0, 2]
    image, caption, idx = ds[3]
    assert color_of(image) == (0, 0, 255) and caption == 'c one' and idx == 2


def test_re_train_dataset_concatenates_files(tmp_path, images):
    first = write_json(tmp_path / 'one.json', [{'image': 'a.jpg', 'caption': 'x', 'image_id': 1}])
    second = write_json(tmp_path / 'two.json', [{'image': 'b.jpg', 'caption': 'y', 'image_id': 2},
                                                {'image': 'a.jpg', 'caption': 'z', 'image_id': 1}])
    ds = re_train_dataset([first, second], None, images)
    assert [(ds[i][1], ds[i][2]) for i in range(3)] == [('x', 0), ('y', 1), ('z', 0)]
    assert ds.origin(2) == (second, 1)


def test_re_eval_dataset(tmp_path, images):
    ann = write_json(tmp_path / 'test.json', [
        {'image': 'a.jpg', 'caption': ['A red one.', 'Another red']},
        {'image': 'b.jpg', 'caption': ['Green!']},
        {'image': 'c.png', 'caption': ['blue 1', 'blue 2', 'blue 3']},
    ])
    ds = re_eval_dataset(ann, None, images)
    assert len(ds) == 3
    assert ds.text == ['a red one', 'another red', 'green', 'blue 1', 'blue 2', 'blue 3']
    assert ds.image == ['a.jpg', 'b.jpg', 'c.png']
    assert ds.txt2img == {0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 2}
    assert ds.img2txt == {0: [0, 1], 1: [2], 2: [3, 4, 5]}
    image, index = ds[1]
    assert color_of(image) == (0, 255, 0) and index == 1


def vqa_items(images):
    return [
        {'dataset': 'vqa', 'image': 'a.jpg', 'question': "What's   this?",
         'answer': ['no', 'yes', 'yes', 'no', 'maybe', 'yes', 'no', 'no', 'no', 'no']},
        {'dataset': 'vg', 'image': 'b.jpg', 'question': 'Where?', 'answer': 'park'},
    ]


def test_vqa_train_answers_and_weights(tmp_path, images):
    vg_root = os.path.join(images, 'vg')
    make_image(os.path.join(vg_root, 'b.jpg'), color=(1, 2, 3))
    ann = write_json(tmp_path / 'vqa.json', vqa_items(images))
    ds = vqa_dataset([ann], None, images, vg_root)
    image, question, answers, weights = ds[0]
    assert color_of(image) == (255, 0, 0)
    assert question == 'whats   this'
    assert answers == ['no[SEP]', 'yes[SEP]', 'maybe[SEP]']  # order of first occurrence, eos appended
    assert weights == [0.6, 0.30000000000000004, 0.1]       # repeated addition of 1/10
    assert weights[1] != 0.3
    image, question, answers, weights = ds[1]
    assert color_of(image) == (1, 2, 3)  # 'vg' images come from vg_root
    assert (question, answers, weights) == ('where', ['park[SEP]'], [0.5])


def test_vqa_custom_eos(tmp_path, images):
    make_image(os.path.join(images, 'vg', 'b.jpg'))
    ann = write_json(tmp_path / 'vqa.json', vqa_items(images))
    assert vqa_dataset(ann, None, images, os.path.join(images, 'vg'), eos='</s>')[1][2] == ['park</s>']


def test_vqa_test_split(tmp_path, images):
    long_question = ' '.join(['word'] * 60)
    ann = write_json(tmp_path / 'vqa_test.json', [
        {'dataset': 'vqa', 'image': 'c.png', 'question': long_question, 'question_id': 42}])
    answer_list = write_json(tmp_path / 'answers.json', ['yes', 'no', 'two'])
    ds = vqa_dataset([ann], None, images, images, split='test', answer_list=answer_list)
    image, question, question_id = ds[0]
    assert color_of(image) == (0, 0, 255) and question_id == 42
    assert len(question.split(' ')) == 50  # test-time questions keep up to 50 words
    assert ds.answer_list == ['yes', 'no', 'two']


def test_ve_dataset_labels(tmp_path, images):
    os.rename(os.path.join(images, 'a.jpg'), os.path.join(images, '1001.jpg'))
    ann = write_json(tmp_path / 've.json', [
        {'image': '1001', 'sentence': 'A RED thing.', 'label': label}
        for label in ('entailment', 'neutral', 'contradiction')])
    ds = ve_dataset(ann, None, images)
    assert [ds[i][2] for i in range(3)] == [2, 1, 0]
    image, sentence, _ = ds[0]
    assert color_of(image) == (255, 0, 0) and sentence == 'a red thing'


def test_nlvr_dataset(tmp_path, images):
    ann = write_json(tmp_path / 'nlvr.json', [
        {'images': ['a.jpg', 'b.jpg'], 'sentence': 'Left is red.', 'label': 'True'},
        {'images': ['b.jpg', 'c.png'], 'sentence': 'x', 'label': 'False'},
        {'images': ['a.jpg', 'c.png'], 'sentence': 'y', 'label': True},  # only the string 'True' counts
    ])
    ds = nlvr_dataset([ann], None, images)
    image0, image1, sentence, label = ds[0]
    assert (color_of(image0), color_of(image1), sentence, label) == ((255, 0, 0), (0, 255, 0), 'left is red', 1)
    assert ds[1][3] == 0 and ds[2][3] == 0


def test_grounding_dataset(tmp_path, images):
    make_image(os.path.join(images, 'other', 'a.jpg'), color=(9, 9, 9))
    items = [
        {'image': 'b.jpg', 'text': 'Left guy', 'ref_id': 11},
        {'image': 'other/a.jpg', 'text': 'The red one', 'ref_id': 12},
        {'image': 'a.jpg', 'text': 'same file name', 'ref_id': 13},
        {'image': 'b.jpg', 'text': 'right guy', 'ref_id': 14},
    ]
    ann = write_json(tmp_path / 'ground.json', items)
    train = grounding_dataset([ann], None, images, mode='train')
    assert [train[i][2] for i in range(4)] == [0, 1, 1, 0]  # by file name, not by path
    image, caption, _ = train[1]
    assert color_of(image) == (9, 9, 9) and caption == 'the red one'
    test = grounding_dataset([ann], None, images, mode='test')
    assert [test[i][2] for i in range(4)] == [11, 12, 13, 14]


def test_vqa_collate_fn():
    batch = [(torch.zeros(3, 4, 4), 'q1', ['a[SEP]', 'b[SEP]'], [0.6, 0.30000000000000004]),
             (torch.ones(3, 4, 4), 'q2', ['c[SEP]'], [0.5])]
    images, questions, answers, weights, n = vqa_collate_fn(batch)
    assert images.shape == (2, 3, 4, 4) and images[1].eq(1).all()
    assert questions == ['q1', 'q2']
    assert answers == ['a[SEP]', 'b[SEP]', 'c[SEP]']
    assert weights.dtype == torch.float32 and torch.equal(weights, torch.tensor([0.6, 0.3, 0.5]))
    assert n == [2, 1]


# ---- create_dataset / samplers / loaders -------------------------------------------------------

@pytest.fixture
def configs(tmp_path, images):
    """A config per task over the tiny images, with image_res 16."""
    make_image(os.path.join(images, '7.jpg'))
    re_train = write_json(tmp_path / 're_train.json', [{'image': 'a.jpg', 'caption': 'x', 'image_id': 0},
                                                      {'image': 'b.jpg', 'caption': 'y', 'image_id': 1}])
    re_test = write_json(tmp_path / 're_test.json', [{'image': 'a.jpg', 'caption': ['x', 'z']}])
    vqa_train = write_json(tmp_path / 'vqa_train.json', [{'dataset': 'vqa', 'image': 'a.jpg', 'question': 'q',
                                                          'answer': ['a', 'b']}])
    vqa_test = write_json(tmp_path / 'vqa_test.json', [{'dataset': 'vqa', 'image': 'a.jpg', 'question': 'q',
                                                        'question_id': 5}])
    answers = write_json(tmp_path / 'answers.json', ['a', 'b'])
    ve = write_json(tmp_path / 've.json', [{'image': '7', 'sentence': 's', 'label': 'neutral'}])
    nlvr = write_json(tmp_path / 'nlvr.json', [{'images': ['a.jpg', 'b.jpg'], 'sentence': 's', 'label': 'True'}])
    ground = write_json(tmp_path / 'ground.json', [{'image': 'a.jpg', 'text': 't', 'ref_id': 3}])
    pre = write_json(tmp_path / 'pre.json', [{'image': os.path.join(images, 'a.jpg'), 'caption': 'c'}])
    base = {'image_res': 16, 'image_root': images}
    return {
        'pretrain': {'image_res': 16, 'train_file': [pre]},
        're': {**base, 'train_file': [re_train], 'val_file': re_test, 'test_file': re_test},
        'vqa': {'image_res': 16, 'train_file': [vqa_train], 'test_file': [vqa_test], 'answer_list': answers,
                'vqa_root': images, 'vg_root': images},
        've': {**base, 'train_file': ve, 'val_file': ve, 'test_file': ve},
        'nlvr': {**base, 'train_file': [nlvr], 'val_file': [nlvr], 'test_file': [nlvr]},
        'grounding': {**base, 'train_file': [ground], 'test_file': [ground, ground]},
    }


@pytest.mark.parametrize('task, classes', [
    ('pretrain', pretrain_dataset),
    ('re', (re_train_dataset, re_eval_dataset, re_eval_dataset)),
    ('vqa', (vqa_dataset, vqa_dataset)),
    ('ve', (ve_dataset, ve_dataset, ve_dataset)),
    ('nlvr', (nlvr_dataset, nlvr_dataset, nlvr_dataset)),
    ('grounding', (grounding_dataset, grounding_dataset)),
])
def test_create_dataset(configs, task, classes):
    built = create_dataset(task, configs[task])
    if task == 'pretrain':
        assert isinstance(built, pretrain_dataset)
        built, classes = (built,), (classes,)
    assert tuple(type(d) for d in built) == classes
    for d in built:
        item = d[0]
        images = [x for x in item if isinstance(x, torch.Tensor)]
        assert images and all(x.shape == (3, 16, 16) for x in images)
    if task == 'vqa':
        assert (built[0].split, built[1].split, built[1].answer_list) == ('train', 'test', ['a', 'b'])
    if task == 'grounding':
        assert (built[0].mode, built[1].mode, len(built[1])) == ('train', 'test', 2)


def test_create_dataset_options_and_errors(configs, tmp_path):
    config = dict(configs['re'], train_file=[write_json(tmp_path / 'gone.json', [
        {'image': 'gone.jpg', 'caption': 'x', 'image_id': 0}])])
    with pytest.raises(DataError, match='image not found'):
        create_dataset('re', config)
    train, _, _ = create_dataset('re', dict(config, check_images=False))
    assert train.num_missing_images == 0 and not train.skip_bad_images
    train, _, _ = create_dataset('re', dict(config, skip_bad_images=True))
    assert train.num_missing_images == 1 and train.skip_bad_images
    with pytest.raises(DataError) as info:
        create_dataset('re', {k: v for k, v in config.items() if k != 'image_root'})
    assert str(info.value) == "config has no 'image_root' (needed by the train dataset, re_train_dataset)"
    with pytest.raises(ValueError, match='unknown dataset'):
        create_dataset('coco', config)


def test_transforms_match_spec():
    from torchvision import transforms
    pre = dataset.build_transform('pretrain', 256).transforms
    assert isinstance(pre[0], transforms.RandomResizedCrop) and pre[0].scale == (0.2, 1.0)
    assert pre[0].interpolation == transforms.InterpolationMode.BICUBIC
    assert isinstance(pre[1], transforms.RandomHorizontalFlip)
    assert (pre[2].N, pre[2].M, pre[2].isPIL, pre[2].augs) == (2, 7, True, dataset.AUGMENTS)
    assert pre[-1].mean == (0.48145466, 0.4578275, 0.40821073)
    assert pre[-1].std == (0.26862954, 0.26130258, 0.27577711)
    assert dataset.build_transform('train', 384).transforms[0].scale == (0.5, 1.0)
    test = dataset.build_transform('test', 384).transforms
    assert isinstance(test[0], transforms.Resize) and test[0].size == (384, 384) and len(test) == 3
    ground = dataset.build_transform('grounding_train', 384).transforms
    assert [type(t).__name__ for t in ground] == ['Resize', 'RandomHorizontalFlip', 'RandomAugment',
                                                  'ToTensor', 'Normalize']


def test_test_transform_is_pil_bicubic_resize():
    import numpy as np
    image = Image.fromarray((np.random.RandomState(0).rand(10, 14, 3) * 255).astype(np.uint8))
    out = dataset.build_transform('test', 8)(image)
    ref = torch.from_numpy(np.array(image.resize((8, 8), Image.BICUBIC))).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(dataset.MEAN)[:, None, None], torch.tensor(dataset.STD)[:, None, None]
    assert torch.allclose(out, (ref - mean) / std, atol=1e-6)


def test_loaders(configs):
    """Training: shuffled, resumable (epoch, index) samples of this rank, whole batches only;
    evaluation: every world-th item in file order, nothing dropped or padded."""
    train, val, _ = create_dataset('re', configs['re'])
    options = {'num_workers': 0}
    loader = train_loader(train, 1, options, rank=1, world_size=2, seed=0)
    assert loader.drop_last and len(loader) == -(-len(train) // 2)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0 + 3)).tolist()  # seed + epoch 3
    order += order[:-len(order) % 2]  # DistributedSampler pads to a multiple of the world size
    loader.sampler.set_epoch(3)
    assert [(epoch, i) for epoch, i in loader.sampler] == [(3, i) for i in order[1::2]]
    _, caption, idx = next(iter(loader))
    _, expected_caption, expected_idx = train[order[1]]
    assert (list(caption), idx.tolist(), loader.skipped) == ([expected_caption], [expected_idx], None)
    loader = eval_loader(val, 2, options, rank=1, world_size=2)
    assert list(loader.sampler) == list(range(1, len(val), 2)) and not loader.drop_last
    assert [index.tolist() for _, index in loader] == [list(range(1, len(val), 2))[k:k + 2]
                                                       for k in range(0, len(range(1, len(val), 2)), 2)]


def test_original_loader_helpers_share_the_loader(configs):
    """create_sampler / create_loader (the original's helpers) build what the scripts' loaders do."""
    train, val, _ = create_dataset('re', configs['re'])
    sampler, = create_sampler([train], [True], num_tasks=2, global_rank=1)
    assert (sampler.shuffle, sampler.num_replicas, sampler.rank) == (True, 2, 1)
    shuffled, ordered = create_loader([train, val], [None, None], [2, 3], 0, [True, False], [None, None])
    assert isinstance(shuffled.sampler, RandomSampler) and shuffled.drop_last
    assert isinstance(ordered.sampler, SequentialSampler) and not ordered.drop_last
    assert [index.tolist() for _, index in ordered] == [list(range(len(val)))[k:k + 3] for k in range(0, len(val), 3)]
    vqa_train, _ = create_dataset('vqa', configs['vqa'])
    image, questions, answers, weights, n = next(iter(create_loader([vqa_train], [None], 1, 0, [True],
                                                                    [vqa_collate_fn])[0]))
    assert answers == ['a[SEP]', 'b[SEP]'] and n == [2] and weights.tolist() == [0.5, 0.5]


# ---- evaluation helpers ------------------------------------------------------------------------

@pytest.mark.parametrize('box2, expected', [
    ([9, 0, 10, 10], 0.0),          # one shared pixel column: not an overlap (strict test)
    ([8, 0, 10, 10], 20 / 180),
    ([2, 3, 4, 5], 20 / 100),       # nested
    ([0, 0, 10, 10], 1.0),
    ([20, 20, 5, 5], 0.0),          # disjoint
    ([0, 9, 10, 10], 0.0),          # one shared pixel row
])
def test_computeIoU(box2, expected):
    assert computeIoU([0, 0, 10, 10], box2) == expected


def test_collect_result_without_process_group(tmp_path):
    result = [{'ref_id': 3, 'pred': torch.ones(2, 2)}]
    merged = collect_result(result, str(tmp_path), 'epoch0', is_json=False)
    assert len(merged) == 1 and merged[0]['ref_id'] == 3 and torch.equal(merged[0]['pred'], torch.ones(2, 2))
    assert not os.path.exists(tmp_path / 'epoch0.pth')
    assert os.path.isfile(tmp_path / 'epoch0_rank0.pth')
    assert collect_result([{'question_id': 1}], str(tmp_path), 'vqa') == [{'question_id': 1}]
    with open(tmp_path / 'vqa_rank0.json') as f:
        assert json.load(f) == [{'question_id': 1}]
    assert collect_result({'k': 'v'}, str(tmp_path), 'j', is_list=False) == {'k': 'v'}
