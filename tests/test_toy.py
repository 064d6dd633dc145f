"""Tests of the synthetic demo world (dataset/toy.py)."""
import collections
import json
import os
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from dataset import toy

SCALE = '0.1'
JSON_FILES = ['pretrain.json', 'retrieval_train.json', 'retrieval_val.json', 'retrieval_test.json',
              'vqa_train.json', 'vqa_val.json', 'vqa_test.json', 'vg_train.json', 'answer_list.json',
              've_train.json', 've_dev.json', 've_test.json', 'nlvr_train.json', 'nlvr_dev.json',
              'nlvr_test.json', 'grounding_train.json', 'grounding_val.json', 'grounding_test.json',
              'scenes.json', 'world.json', 'refcoco+/instances.json', 'refcoco+/dets.json',
              'refcoco+/cocos.json', 'text_encoder/tokenizer_config.json']


def _generate(base, seed=0, extra=()):
    """Generate into base/demo, run from base so the relative --out is what gets recorded."""
    cwd = os.getcwd()
    os.makedirs(base, exist_ok=True)
    os.chdir(base)
    try:
        toy.main(['--out', 'demo', '--seed', str(seed), '--scale', SCALE, *extra])
    finally:
        os.chdir(cwd)
    return os.path.join(base, 'demo')


def _tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, 'rb') as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    base = str(tmp_path_factory.mktemp('toy'))
    out = _generate(base)

    def load(name):
        with open(os.path.join(out, name)) as f:
            return json.load(f)

    data = {name: load(name) for name in JSON_FILES}
    with open(os.path.join(out, 'refcoco+', 'refs(unc).p'), 'rb') as f:
        data['refs'] = pickle.load(f)
    scenes = {sc['image']: sc for sc in data['scenes.json']}
    return {'base': base, 'out': out, 'data': data, 'scenes': scenes}


# --------------------------------------------------------------------------- parsing helpers
NP_RE = re.compile(r'the(?: (small|large))?(?: (red|green|blue|yellow|purple|white))?'
                   r' (circle|square|triangle|shape)'
                   r'(?: on the (left|right)| at the (top|bottom)(?: (left|right))?)?$')


def parse_np(text):
    """'the small red circle at the top left' -> attribute dict (test's own parser)."""
    m = NP_RE.match(text)
    assert m, text
    size, color, kind, h1, v, h2 = m.groups()
    attrs = {'size': size, 'color': color, 'kind': None if kind == 'shape' else kind, 'h': h1 or h2, 'v': v}
    return {k: x for k, x in attrs.items() if x is not None}


def referent(scene, np_text):
    attrs = parse_np(np_text)
    hits = [s for s in scene['shapes'] if all(s[k] == x for k, x in attrs.items())]
    assert len(hits) == 1, (np_text, scene)
    return hits[0]


def majority(answers):
    (ans, n), = collections.Counter(answers).most_common(1)
    return ans, n


def pixel(world, image, xy):
    with Image.open(os.path.join(world['out'], 'images', image)) as im:
        return im.convert('RGB').getpixel(tuple(xy))


# --------------------------------------------------------------------------- tests
def test_deterministic(world, tmp_path):
    again = _generate(str(tmp_path / 'again'))
    a, b = _tree(world['out']), _tree(again)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name
    other = _tree(_generate(str(tmp_path / 'other'), seed=1))
    assert sorted(other) == sorted(a)
    assert other['scenes.json'] != a['scenes.json']
    assert other['images/train_00000.png'] != a['images/train_00000.png'] or \
        other['images/train_00001.png'] != a['images/train_00001.png']


def test_manifest_and_files(world, capsys):
    d = world['data']
    m = d['world.json']
    n_train, n_eval = m['images']['train'], m['images']['val']
    assert (n_train, n_eval, m['images']['test']) == (60, 10, 10)
    for name, count in m['files'].items():
        if isinstance(count, int) and name in d:
            assert len(d[name]) == count, name
    assert len(d['pretrain.json']) == n_train
    assert len(d['retrieval_val.json']) == len(d['retrieval_test.json']) == n_eval
    assert os.path.exists(os.path.join(world['out'], 'README.txt'))
    assert len(d['scenes.json']) == n_train + 2 * n_eval


def test_json_keys(world):
    d, out = world['data'], world['out']
    for it in d['pretrain.json']:
        assert set(it) == {'image', 'caption'}
        assert it['image'] == os.path.join('demo', 'images', os.path.basename(it['image']))
        assert os.path.exists(os.path.join(world['base'], it['image']))
        assert isinstance(it['caption'], list) and all(isinstance(c, str) for c in it['caption'])
    for it in d['retrieval_train.json']:
        assert set(it) == {'image', 'caption', 'image_id'} and isinstance(it['caption'], str)
        assert it['image_id'] == os.path.splitext(it['image'])[0]
    for name in ('retrieval_val.json', 'retrieval_test.json'):
        for it in d[name]:
            assert set(it) == {'image', 'caption'}
            assert len(it['caption']) == 5 and len(set(it['caption'])) == 5
    answers = set(d['answer_list.json'])
    for name in ('vqa_train.json', 'vqa_val.json', 'vqa_test.json'):
        qids = [it['question_id'] for it in d[name]]
        assert len(set(qids)) == len(qids)
        for it in d[name]:
            assert set(it) == {'dataset', 'image', 'question', 'answer', 'question_id'}
            assert it['dataset'] == 'vqa' and isinstance(it['question_id'], int)
            assert len(it['answer']) == 10 and set(it['answer']) <= answers
            assert it['question'].endswith('?')
    assert d['vg_train.json']
    for it in d['vg_train.json']:
        assert it['dataset'] == 'vg' and isinstance(it['answer'], str) and it['answer'] in answers
        assert {'image', 'question'} <= set(it)
    for name in ('ve_train.json', 've_dev.json', 've_test.json'):
        labels = collections.Counter(it['label'] for it in d[name])
        assert set(labels) == {'entailment', 'neutral', 'contradiction'}
        assert len(set(labels.values())) == 1  # balanced
        for it in d[name]:
            assert set(it) == {'image', 'sentence', 'label'}
            assert os.path.exists(os.path.join(out, 'images', it['image'] + '.jpg'))
    for name in ('nlvr_train.json', 'nlvr_dev.json', 'nlvr_test.json'):
        for it in d[name]:
            assert set(it) == {'images', 'sentence', 'label'}
            assert len(it['images']) == 2 and it['label'] in ('True', 'False')
            for p in it['images']:
                assert os.path.exists(os.path.join(out, 'images', p))
    for it in d['grounding_train.json']:
        assert {'image', 'text'} <= set(it)
    for name in ('grounding_val.json', 'grounding_test.json'):
        for it in d[name]:
            assert set(it) == {'image', 'text', 'ref_id'} and isinstance(it['ref_id'], int)
    inst = d['refcoco+/instances.json']
    assert set(inst) == {'images', 'annotations', 'categories'}
    assert all({'id', 'file_name', 'height', 'width'} <= set(x) for x in inst['images'])
    assert all({'id', 'image_id', 'bbox', 'category_id'} <= set(x) for x in inst['annotations'])
    assert d['refcoco+/cocos.json'] == d['refcoco+/dets.json']
    with open(os.path.join(out, 'text_encoder', 'vocab.txt')) as f:
        vocab = f.read().split('\n')[:-1]
    assert vocab[:5] == ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
    assert len(vocab) == len(set(vocab)) == d['world.json']['vocab_size']


def test_images(world):
    size = world['data']['world.json']['size']
    for sc in world['data']['scenes.json']:
        for ext in ('.png', '.jpg'):
            path = os.path.join(world['out'], 'images', os.path.splitext(sc['image'])[0] + ext)
            with Image.open(path) as im:
                assert im.size == (size, size) and im.mode == 'RGB'
                rgb = np.asarray(im.convert('RGB')).astype(int)
            assert tuple(rgb[0, 0]) == tuple(sc['background']) or ext == '.jpg'
            for s in sc['shapes']:
                x, y = s['center']
                x0, y0, w, h = s['bbox']
                assert x0 <= x < x0 + w and y0 <= y < y0 + h
                if ext == '.png':
                    assert tuple(rgb[y, x]) == tuple(s['rgb']) == tuple(toy.COLORS[s['color']])
                    # the box is tight: the shape's colour reaches every side of it
                    box = (rgb[y0:y0 + h, x0:x0 + w] == s['rgb']).all(-1)
                    assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
                else:
                    assert np.abs(rgb[y, x] - s['rgb']).max() <= 40
            # one shape per quadrant, sizes as named
            assert len({(s['h'], s['v']) for s in sc['shapes']}) == len(sc['shapes'])
            for s in sc['shapes']:
                assert (s['bbox'][2] > 0.28 * size) == (s['size'] == 'large')


def test_vqa_answers_true(world):
    d = world['data']
    seen = collections.Counter()
    for name in ('vqa_train.json', 'vqa_val.json', 'vqa_test.json', 'vg_train.json'):
        for it in d[name]:
            sc = world['scenes'][it['image']]
            shapes = sc['shapes']
            ans, n = majority(it['answer']) if isinstance(it['answer'], list) else (it['answer'], 10)
            assert n >= 7
            q = it['question']
            if q.startswith('what color is '):
                s = referent(sc, q[len('what color is '):-1])
                assert ans == s['color']
                assert pixel(world, it['image'], s['center']) == toy.COLORS[ans]
                seen['color'] += 1
            elif q.startswith('what shape is '):
                assert ans == referent(sc, q[len('what shape is '):-1])['kind']
                seen['shape'] += 1
            elif q.startswith('what size is '):
                assert ans == referent(sc, q[len('what size is '):-1])['size']
                seen['size'] += 1
            elif q == 'how many shapes are there?':
                assert ans == toy.NUMBERS[len(shapes)]
                seen['count'] += 1
            elif q.startswith('how many '):
                what = q.split()[2]
                if what in toy.COLORS:
                    assert ans == toy.NUMBERS[sum(s['color'] == what for s in shapes)]
                else:
                    assert ans == toy.NUMBERS[sum(s['kind'] + 's' == what for s in shapes)]
                seen['count'] += 1
            elif q.startswith('is there a '):
                color, kind = q[len('is there a '):-1].split()
                present = any(s['color'] == color and s['kind'] == kind for s in shapes)
                assert ans == ('yes' if present else 'no')
                seen['exist'] += 1
            else:
                m = re.match(r'is (.*) (?:on the (left|right)|at the (top|bottom))\?$', q)
                assert m, q
                s = referent(sc, m.group(1))
                truth = s['h'] == m.group(2) if m.group(2) else s['v'] == m.group(3)
                assert ans == ('yes' if truth else 'no')
                seen['position'] += 1
    assert set(seen) == {'color', 'shape', 'size', 'count', 'exist', 'position'}


CAP_RE = re.compile(r'\ba (?:(small|large) )?(red|green|blue|yellow|purple|white) (circle|square|triangle)'
                    r'(?: (?:on the (left|right)|at the (top|bottom)(?: (left|right))?))?')


def test_captions_true(world):
    d = world['data']
    items = [(os.path.basename(it['image']), it['caption']) for it in d['pretrain.json']]
    items += [(it['image'], [it['caption']]) for it in d['retrieval_train.json']]
    items += [(it['image'], it['caption']) for name in ('retrieval_val.json', 'retrieval_test.json')
              for it in d[name]]
    for image, caps in items:
        sc = world['scenes'][image]
        for c in caps:
            assert len(c.split()) <= 20, c
            mentions = CAP_RE.findall(c)
            if mentions:
                for size, color, kind, h1, v, h2 in mentions:
                    attrs = {'size': size, 'color': color, 'kind': kind, 'h': h1 or h2, 'v': v}
                    assert any(all(s[k] == x for k, x in attrs.items() if x) for s in sc['shapes']), (c, sc)
                if re.match(r'(one|two|three) shapes?:', c):
                    assert c.split()[0] == toy.NUMBERS[len(sc['shapes'])]
                    assert len(mentions) == len(sc['shapes'])
            else:
                m = re.match(r'(the .*) is (\w+)$', c)
                assert m, c
                assert referent(sc, m.group(1))['color'] == m.group(2)


def test_retrieval_captions_are_their_own(world):
    # a retrieval caption is true of no other image of its split where the image has enough captions
    # of its own (scene_captions lists every caption a scene can have)
    d, own_images = world['data'], 0
    for split, name, k in (('train', 'retrieval_train.json', 3), ('val', 'retrieval_val.json', 5),
                           ('test', 'retrieval_test.json', 5)):
        scenes = [sc for sc in d['scenes.json'] if sc['split'] == split]
        owners = collections.Counter(c for sc in scenes for c in toy.scene_captions(sc))
        captions = collections.defaultdict(list)
        for it in d[name]:
            captions[it['image']] += it['caption'] if isinstance(it['caption'], list) else [it['caption']]
        assert set(captions) == {sc['image'] for sc in scenes}
        for sc in scenes:
            caps, own = captions[sc['image']], [c for c in toy.scene_captions(sc) if owners[c] == 1]
            assert len(caps) == len(set(caps)) and set(caps) <= set(toy.scene_captions(sc))
            assert sum(owners[c] == 1 for c in caps) == min(len(own), k) or not own, (caps, own)
            own_images += bool(own)
    assert own_images > 0.5 * len(d['scenes.json'])


def test_ve_labels_true(world):
    d = world['data']
    for name in ('ve_train.json', 've_dev.json', 've_test.json'):
        for it in d[name]:
            sc = world['scenes'][it['image'] + '.png']
            shapes, sent, label = sc['shapes'], it['sentence'], it['label']
            if ' may be ' in sent:
                assert label == 'neutral'
                m = re.match(r'(?:there may be a (\w+) (\w+) behind|a (\w+) (\w+) may be behind) (.*)$', sent)
                color, kind = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
                assert not any(s['color'] == color and s['kind'] == kind for s in shapes)
                referent(sc, m.group(5))
                continue
            m = re.match(r'there is a (\w+) (\w+) on the (\w+)$', sent)
            if m:
                truth = any((s['color'], s['kind'], s['h']) == m.groups() for s in shapes)
            elif re.match(r'there (is one shape|are \w+ shapes)$', sent):
                truth = sent.split()[2] == toy.NUMBERS[len(shapes)]
            else:
                m = re.match(r'(the .*) is (\w+)$', sent)
                assert m, sent
                truth = referent(sc, m.group(1))['color'] == m.group(2)
            assert label == ('entailment' if truth else 'contradiction'), (sent, sc)


def _nlvr_truth(sent, a, b):
    has = lambda scene, **kw: any(all(s[k] == x for k, x in kw.items()) for s in scene['shapes'])  # noqa: E731
    w = sent.split()
    if sent.startswith('both images contain a '):
        kw = {'color': w[4]} if w[-1] == 'shape' else {'kind': w[4]}
        return has(a, **kw) and has(b, **kw)
    if sent.startswith('at least one image contains a '):
        return has(a, color=w[6], kind=w[7]) or has(b, color=w[6], kind=w[7])
    m = re.fullmatch(r'the (left|right) image contains a (\w+) (\w+)', sent)
    assert m, sent
    kw = {'color': m.group(2)} if m.group(3) == 'shape' else {'color': m.group(2), 'kind': m.group(3)}
    return has(a if m.group(1) == 'left' else b, **kw)


def test_nlvr_labels_true(world):
    d = world['data']
    for name in ('nlvr_train.json', 'nlvr_dev.json', 'nlvr_test.json'):
        labels = collections.Counter(it['label'] for it in d[name])
        assert labels['True'] > 0.2 * len(d[name]) and labels['False'] > 0.2 * len(d[name])  # 20 items at 0.1 scale
        for it in d[name]:
            a, b = (world['scenes'][p] for p in it['images'])
            assert it['label'] == str(_nlvr_truth(it['sentence'], a, b)), it


def sentence_template(sentence):
    """The sentence with its colours, shapes, sizes, sides and numbers blanked out."""
    words = {*toy.COLORS, *toy.KINDS, *(k + 's' for k in toy.KINDS), *toy.SIZES, *toy.HPOS, *toy.VPOS,
             *toy.NUMBERS}
    return ' '.join('X' if word in words or word.isdigit() else word for word in sentence.split())


def test_nlvr_words_do_not_predict_the_label():
    rng = np.random.default_rng(0)
    scenes = [{**toy.make_scene(rng, 1 + i % 3, 64), 'image': f'{i}.png'} for i in range(60)]
    by_image = {sc['image']: sc for sc in scenes}
    items = toy.nlvr_items(rng, scenes, 4000)
    labels = collections.defaultdict(collections.Counter)
    for it in items:
        a, b = (by_image[p] for p in it['images'])
        assert it['label'] == str(_nlvr_truth(it['sentence'], a, b)), it
        labels[sentence_template(it['sentence'])][it['label']] += 1
    assert len(labels) == 5
    for template, counts in labels.items():  # about 800 items each: 0.5 +- 0.018
        assert 0.4 < counts['True'] / sum(counts.values()) < 0.6, (template, counts)
    # and whole sentences: the most frequent ones ("both images contain a circle", ...)
    for sentence, counts in collections.Counter(it['sentence'] for it in items).most_common(5):
        true = sum(it['label'] == 'True' for it in items if it['sentence'] == sentence)
        assert 0.3 < true / counts < 0.7, (sentence, true, counts)


def _plain(obj):
    if isinstance(obj, dict):
        return type(obj) is dict and all(type(k) is str and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return type(obj) is list and all(_plain(v) for v in obj)
    return type(obj) in (str, int, float)


def test_refcoco(world):
    d = world['data']
    refs, inst, dets = d['refs'], d['refcoco+/instances.json'], d['refcoco+/dets.json']
    assert _plain(refs) and _plain(inst) and _plain(dets)
    anns = {a['id']: a for a in inst['annotations']}
    imgs = {i['id']: i for i in inst['images']}
    ref_by_id = {r['ref_id']: r for r in refs}
    assert len(ref_by_id) == len(refs)
    assert {r['split'] for r in refs} == {'train', 'val', 'testA', 'testB'}
    for r in refs:
        assert {'ref_id', 'ann_id', 'image_id', 'split', 'sentences', 'category_id'} <= set(r)
        ann = anns[r['ann_id']]
        assert ann['image_id'] == r['image_id'] and ann['category_id'] == r['category_id']
        img = imgs[r['image_id']]
        sc = world['scenes'][img['file_name']]
        assert sc['image_id'] == img['id'] and (img['width'], img['height']) == (sc['width'], sc['height'])
        shape = next(s for s in sc['shapes'] if s['ann_id'] == r['ann_id'])
        assert ann['bbox'] == shape['bbox']
        assert inst['categories'][r['category_id'] - 1]['name'] == shape['kind']
        for s in r['sentences']:
            assert {'sent', 'raw'} <= set(s)
            assert referent(sc, s['sent']) is shape
        boxes = dets[str(r['image_id'])]
        assert all(len(b) == 5 for b in boxes)
        assert [float(x) for x in ann['bbox']] in [b[:4] for b in boxes]
        assert len(boxes) >= len(sc['shapes']) + 2
        want = {'testA': 2, 'testB': 3}.get(r['split'])
        assert want is None or len(sc['shapes']) == want
    for name, splits in (('grounding_train.json', {'train'}), ('grounding_val.json', {'val'}),
                         ('grounding_test.json', {'testA', 'testB'})):
        got = set()
        for it in d[name]:
            r = ref_by_id[it['ref_id']]
            got.add(r['split'])
            assert imgs[r['image_id']]['file_name'] == it['image']
            assert it['text'] in [s['sent'] for s in r['sentences']]
        assert got == splits, name


def test_vocab_covers_everything(world):
    from models.tokenization_bert import BertTokenizer
    tok = BertTokenizer.from_pretrained(os.path.join(world['out'], 'text_encoder'))
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == \
        (0, 1, 2, 3, 4)
    d = world['data']
    texts = toy.all_texts(d)
    texts += [a + '[SEP]' for a in d['answer_list.json']]
    texts += [it['text'] for name in ('grounding_train.json', 'grounding_val.json',
                                      'grounding_test.json') for it in d[name]]
    ids = tok(texts, padding='longest').input_ids
    assert not (ids == tok.unk_token_id).any()
    assert tok('yes[SEP]', return_tensors=None).input_ids == [2, tok.convert_tokens_to_ids('yes'), 3]
    used = set(ids.flatten().tolist())
    assert used >= set(range(5, len(tok)))  # no vocabulary entry is wasted


def test_cli_summary(tmp_path, capsys):
    m = toy.main(['--out', str(tmp_path / 'w'), '--scale', '0.02', '--size', '48', '--seed', '3'])
    assert 'demo world written' in capsys.readouterr().out
    assert m['size'] == 48 and m['seed'] == 3
    with Image.open(tmp_path / 'w' / 'images' / 'test_00000.png') as im:
        assert im.size == (48, 48)
