"""The built-in "demo world": a tiny synthetic dataset for every ALBEF task.

    python -m dataset.toy --out data/demo [--seed 0] [--size 64] [--scale 1.0]

writes, deterministically from ``--seed`` (same bytes for the same seed, size,
scale and ``--out`` string), images and annotation files in the ORIGINAL ALBEF
JSON formats (docs/DESIGN.md, "Datasets and annotation formats"), so the unchanged
dataset classes, scripts and
a tiny model can learn something real on a CPU in minutes.

The world
---------
Each scene is a ``size`` x ``size`` RGB image with a plain grey background
(grey level drawn per image) and 1-3 non-overlapping shapes. The image is cut
into a 2 x 2 grid and every shape sits in its own cell, so each shape has

* a colour: red, green, blue, yellow, purple, white (distinct pure RGB values,
  drawn without anti-aliasing, so the pixel at a shape's centre is exactly its
  colour in the PNGs);
* a kind: circle, square, triangle (an isosceles triangle pointing up);
* a size: small (radius ~0.1 size) or large (radius ~0.2 size);
* a position: left/right and top/bottom (its grid cell). Because cells are
  distinct, "at the top left" always identifies one shape.

Noun phrases ("the red circle", "the large shape on the left") are always
built from the shortest attribute combination that identifies exactly one
shape of the scene, so every question, caption and referring expression is
true and unambiguous. Each scene's full description (attributes, tight pixel
box ``[x, y, w, h]`` and an inside ``center`` pixel) is in ``scenes.json``.

Three pools of scenes are drawn: train (600 x scale), val and test
(100 x scale each); the shape counts 1/2/3 are balanced within each pool. The
tasks reuse the pools (train pool for training files, val for val/dev, test
for test), so every file of a split refers to the same images.

Note: the original training transforms flip images horizontally, which makes
"left"/"right" in a caption wrong half of the time (docs/DESIGN.md, "Image transforms");
"top"/"bottom" and the other attributes are flip-invariant.

Files (inside ``--out``; ``<out>`` is the string given on the command line)
-----------------------------------------------------------------------------
images/<split>_<nnnnn>.png     every scene (split = train, val, test)
images/<split>_<nnnnn>.jpg     the same scenes as JPEG (quality 95), for VE
scenes.json                    [{"image", "image_id", "split", "width",
                                 "height", "background", "shapes": [{"color",
                                 "rgb", "kind", "size", "h", "v", "center",
                                 "bbox", "ann_id"}]}]
pretrain.json                  [{"image": "<out>/images/train_*.png",
                                 "caption": [5 captions]}]  (pretrain_dataset
                                 opens "image" as given, relative to the CWD)
retrieval_train.json           [{"image": "train_*.png", "caption", "image_id"}]
                                 up to 3 captions per image, image_root
                                 <out>/images
retrieval_val.json, retrieval_test.json
                               [{"image", "caption": [5 captions]}]
vqa_train.json, vqa_val.json   [{"dataset": "vqa", "image", "question",
                                 "answer": [10 annotator answers],
                                 "question_id"}], vqa_root <out>/images
vqa_test.json                  same keys (the answers allow local scoring)
vg_train.json                  [{"dataset": "vg", "image", "question",
                                 "answer": str}], vg_root <out>/images
answer_list.json               the 17 candidate answers
ve_train.json, ve_dev.json, ve_test.json
                               [{"image": "train_00012" (file is
                                 <image_root>/<id>.jpg), "sentence", "label"}]
nlvr_train.json, nlvr_dev.json, nlvr_test.json
                               [{"images": [p0, p1], "sentence",
                                 "label": "True"|"False"}]
refcoco+/refs(unc).p           pickled list of refs {"ref_id", "ann_id",
                                 "image_id", "split", "sentences": [{"sent",
                                 "raw", "tokens", "sent_id"}], "sent_ids",
                                 "category_id", "file_name"}
refcoco+/instances.json        {"images", "annotations", "categories"} (COCO)
refcoco+/dets.json             {str(image_id): [[x, y, w, h, score], ...]}:
                                 every shape's box plus 2-3 distractor boxes
refcoco+/cocos.json            identical to dets.json
grounding_train.json           [{"image", "text", "ref_id", "image_id"}]
grounding_val.json, grounding_test.json
                               [{"image", "text", "ref_id"}]
shards/{000000..000005}.tar    the pre-training items of pretrain.json as tar shards
                                 (webdataset's ShardWriter, img2dataset layout): per
                                 sample train_<n>.png, .txt (first caption), .json
                                 {"captions": [5 captions], "image"}; six shards
classify/<color>_<kind>/*.png  zero-shot classification (torchvision's ImageFolder
                                 layout): one-shape scenes drawn apart from the pools,
                                 10 x scale (at least 2) per class, 18 classes
classify/templates.txt         prompt templates in the captions' words ("there is a {}")
text_encoder/vocab.txt         WordPiece vocabulary covering every text
text_encoder/tokenizer_config.json
README.txt, world.json         description and counts

Task design
-----------
* Captions: several templates, each true of the scene ("a large red circle on
  the left", "there is a small blue square", "two shapes: a green triangle and
  a white circle", "the circle on the left is red"), at most 20 words.
  Pre-training takes any true captions, like web alt-text, where "there is
  a large purple circle" fits many images. The retrieval files take the
  captions that no other scene of their split has (the others only where a
  scene has too few of its own), like COCO captions: a retrieval caption has
  one right image, and the other images of a split are true negatives.
* VQA: four questions per image, always a colour question ("what color is the
  circle?") and a count question ("how many shapes are there?", "how many red
  shapes are there?" -> zero/one/two/three), plus two of shape ("what shape is
  the red shape?"), size ("what size is the red circle?" -> large/small),
  position ("is the red square on the left?" -> yes/no, balanced) and existence
  ("is there a blue triangle?" -> yes/no, balanced). Each has 10 annotator
  answers: the true answer with 0-3 of them replaced by a wrong answer of the
  same type, so the true answer is always the majority.
* SNLI-VE: one sentence of each label per image.
  entailment: a true statement ("there is a red circle on the left", "the
  large shape is red", "there are two shapes");
  contradiction: the same templates with the WRONG colour of a shape that
  exists ("the large shape is blue" when it is red);
  neutral: a hedged statement about a hidden shape that is absent from the
  image, which the image can neither confirm nor refute ("there may be a
  green triangle behind the red circle", "a white square may be behind the
  large shape"). Telling neutral needs only the text's "may"; telling
  entailment from contradiction needs the image.
* NLVR2: statements about an image pair, "left image" = images[0] and "right
  image" = images[1] ("both images contain a red shape", "both images contain
  a circle", "at least one image contains a blue square", "the left image
  contains a green triangle", "the right image contains a white shape"). Each
  statement is drawn from the words alone, then its label (True or False, half
  each), then an image pair with that label: the words never predict the
  label, only the images do.
* RefCOCO+: one ref per shape of every scene with 2 or 3 shapes, with two
  referring expressions ("the red circle", "the small red circle on the
  left"). Splits follow the image pools: train, val, and the test pool split
  into testA (scenes with two shapes) and testB (three shapes, harder).
"""
import argparse
import collections
import json
import os
import pickle
import re
import time

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    'red': (230, 30, 30),
    'green': (30, 190, 50),
    'blue': (40, 80, 240),
    'yellow': (245, 225, 30),
    'purple': (160, 50, 210),
    'white': (250, 250, 250),
}
KINDS = ('circle', 'square', 'triangle')
SIZES = ('small', 'large')
HPOS = ('left', 'right')
VPOS = ('top', 'bottom')
NUMBERS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six')
CATEGORY_IDS = {k: i + 1 for i, k in enumerate(KINDS)}
ANSWER_TYPES = {
    'color': list(COLORS),
    'shape': list(KINDS),
    'size': list(SIZES),
    'count': list(NUMBERS[:4]),
    'yesno': ['yes', 'no'],
}
ANSWER_LIST = [a for t in ('color', 'shape', 'size', 'count', 'yesno') for a in ANSWER_TYPES[t]]
SPECIAL_TOKENS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
MAX_CAPTION_WORDS = 20

# attribute subsets tried, in order, for the shortest unambiguous noun phrase
NP_ORDER = [('kind',), ('color', 'kind'), ('size', 'kind'), ('size', 'color', 'kind'),
            ('kind', 'h'), ('kind', 'v'), ('color', 'kind', 'h'), ('color', 'kind', 'v'),
            ('size', 'color', 'kind', 'h'), ('size', 'color', 'kind', 'v'), ('kind', 'h', 'v'),
            ('color',), ('size',), ('size', 'color'), ('color', 'h'), ('color', 'v'),
            ('h',), ('v',), ('h', 'v')]


# ----------------------------------------------------------------------------- scenes
def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def make_scene(rng, n_shapes, size):
    """Draw the attributes of a scene with ``n_shapes`` shapes (no pixels yet)."""
    cells = rng.permutation(4)[:n_shapes]
    half = size / 2.0
    shapes = []
    for cell in sorted(int(c) for c in cells):  # reading order: top left, top right, ...
        h, v = HPOS[cell % 2], VPOS[cell // 2]
        sz = _pick(rng, SIZES)
        r = size * (rng.uniform(0.08, 0.11) if sz == 'small' else rng.uniform(0.17, 0.2))
        x0, y0 = (cell % 2) * half, (cell // 2) * half
        lo_x, hi_x = x0 + r + 1, x0 + half - r - 2
        lo_y, hi_y = y0 + r + 1, y0 + half - r - 2
        cx = rng.uniform(lo_x, max(lo_x, hi_x))
        cy = rng.uniform(lo_y, max(lo_y, hi_y))
        shapes.append({'color': _pick(rng, list(COLORS)), 'kind': _pick(rng, KINDS), 'size': sz,
                       'h': h, 'v': v, 'cx': float(cx), 'cy': float(cy), 'r': float(r)})
    return {'background': int(rng.integers(40, 110)), 'shapes': shapes}


def _draw_shape(draw, s, fill):
    cx, cy, r = s['cx'], s['cy'], s['r']
    box = [round(cx - r), round(cy - r), round(cx + r), round(cy + r)]
    if s['kind'] == 'circle':
        draw.ellipse(box, fill=fill)
    elif s['kind'] == 'square':
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2.0, box[1])], fill=fill)


def render_scene(scene, size):
    """Render the scene; fill in each shape's tight ``bbox`` and an inside ``center`` pixel."""
    g = scene['background']
    img = Image.new('RGB', (size, size), (g, g, g))
    draw = ImageDraw.Draw(img)
    for s in scene['shapes']:
        _draw_shape(draw, s, COLORS[s['color']])
        mask = Image.new('L', (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), s, 255)
        l, t, r, b = mask.getbbox()
        s['bbox'] = [l, t, r - l, b - t]
        ys, xs = np.nonzero(np.asarray(mask))
        cx, cy = int(round(xs.mean())), int(round(ys.mean()))
        if mask.getpixel((cx, cy)) == 0:  # never for convex shapes; be safe anyway
            k = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
            cx, cy = int(xs[k]), int(ys[k])
        s['center'] = [cx, cy]
    return img


# ----------------------------------------------------------------------------- language
def _matches(s, attrs):
    return all(s[k] == v for k, v in attrs.items())


def render_np(attrs, article='the'):
    """Noun phrase for a dict of attributes, e.g. 'the small red circle on the left'."""
    words = [article]
    if 'size' in attrs:
        words.append(attrs['size'])
    if 'color' in attrs:
        words.append(attrs['color'])
    words.append(attrs.get('kind', 'shape'))
    if 'h' in attrs and 'v' in attrs:
        words += ['at', 'the', attrs['v'], attrs['h']]
    elif 'h' in attrs:
        words += ['on', 'the', attrs['h']]
    elif 'v' in attrs:
        words += ['at', 'the', attrs['v']]
    return ' '.join(words)


def unique_attrs(shape, shapes, exclude=(), start=0):
    """Shortest attribute subset (in NP_ORDER, from ``start``) picking out ``shape`` alone.

    Returns None if no subset avoiding ``exclude`` identifies it.
    """
    seen = set()
    for keys in NP_ORDER[start:]:
        keys = tuple(k for k in keys if k not in exclude)
        if not keys or keys in seen:
            continue
        seen.add(keys)
        attrs = {k: shape[k] for k in keys}
        if sum(_matches(s, attrs) for s in shapes) == 1:
            return attrs
    return None


def plural(kind):
    return kind + 's'


def count_phrase(n, noun='shape'):
    return f'{NUMBERS[n]} {noun if n == 1 else plural(noun)}'


def scene_captions(scene):
    """All true captions of a scene (deterministic order, no duplicates)."""
    shapes = scene['shapes']
    n = len(shapes)
    caps = []

    def add(c):
        if len(c.split()) <= MAX_CAPTION_WORDS and c not in caps:
            caps.append(c)

    def a(s, with_size=True):
        return f"a {s['size']} {s['color']} {s['kind']}" if with_size else f"a {s['color']} {s['kind']}"

    def join(items):
        return items[0] if len(items) == 1 else ', '.join(items[:-1]) + ' and ' + items[-1]

    for with_size in (False, True):
        add(f'{count_phrase(n)}: ' + join([a(s, with_size) for s in shapes]))
    add(join([f"{a(s)} at the {s['v']} {s['h']}" for s in shapes]))
    add(join([f"{a(s, False)} on the {s['h']}" for s in shapes]))
    for s in shapes:
        add(f"{a(s)} on the {s['h']}")
        add(f"{a(s)} at the {s['v']}")
        add(f"there is {a(s)}")
        add(f"there is {a(s, False)} at the {s['v']} {s['h']}")
        np_ = unique_attrs(s, shapes, exclude=('color',), start=4)  # a position-based phrase
        if np_ is not None:
            add(f"{render_np(np_)} is {s['color']}")
    return caps


def own_captions(scenes):
    """For each scene, (its captions that no other scene of ``scenes`` has, its other captions).
    The retrieval files take a scene's own captions: with any true caption, about half of them had
    another image in a batch of 32 that they were just as true of, so fine-tuning learned from
    wrong negatives (it gained under 1 r_mean on the demo, or lost at higher rates), and the
    evaluation counted right images as wrong."""
    captions = [scene_captions(sc) for sc in scenes]
    counts = collections.Counter(c for caps in captions for c in caps)
    return [([c for c in caps if counts[c] == 1], [c for c in caps if counts[c] > 1]) for caps in captions]


def pick_captions(rng, own, shared, k, exactly=False):
    """Up to k of the scene's own captions (of the others when it has none); with ``exactly``, the
    others fill up to k."""
    caps = choose(rng, own or shared, k)
    if exactly and len(caps) < k:
        caps += choose(rng, [c for c in shared if c not in caps], k - len(caps))
    return caps


def choose(rng, items, k):
    """k distinct items (fewer if there are not enough), in a seeded random order."""
    idx = rng.permutation(len(items))[:k]
    return [items[int(i)] for i in idx]


# ----------------------------------------------------------------------------- VQA
def _noisy_answers(rng, truth, atype):
    answers = [truth] * 10
    n_noise = min(int(rng.binomial(10, 0.1)), 3)
    wrong = [x for x in ANSWER_TYPES[atype] if x != truth]
    for pos in rng.permutation(10)[:n_noise]:
        answers[int(pos)] = _pick(rng, wrong)
    return answers


def vqa_question(rng, scene, qtype):
    """(question, answer, answer type) of type qtype about the scene, or None if impossible."""
    shapes = scene['shapes']
    s = _pick(rng, shapes)
    if qtype == 'color':
        return f"what color is {render_np(unique_attrs(s, shapes, ('color',)))}?", s['color'], 'color'
    if qtype == 'shape':
        return f"what shape is {render_np(unique_attrs(s, shapes, ('kind',)))}?", s['kind'], 'shape'
    if qtype == 'size':
        return f"what size is {render_np(unique_attrs(s, shapes, ('size',)))}?", s['size'], 'size'
    if qtype == 'count':
        which = int(rng.integers(3))
        if which == 0:
            return 'how many shapes are there?', NUMBERS[len(shapes)], 'count'
        if which == 1:
            c = _pick(rng, list(COLORS))
            return (f'how many {c} shapes are there?', NUMBERS[sum(t['color'] == c for t in shapes)],
                    'count')
        k = _pick(rng, KINDS)
        return f'how many {plural(k)} are there?', NUMBERS[sum(t['kind'] == k for t in shapes)], 'count'
    if qtype == 'position':
        cands = [(t, unique_attrs(t, shapes, ('h', 'v'))) for t in shapes]
        cands = [(t, np_) for t, np_ in cands if np_ is not None]
        if not cands:
            return None
        t, np_ = _pick(rng, cands)
        axis = _pick(rng, ('h', 'v'))
        word = _pick(rng, HPOS if axis == 'h' else VPOS)
        where = f'on the {word}' if axis == 'h' else f'at the {word}'
        return f'is {render_np(np_)} {where}?', 'yes' if t[axis] == word else 'no', 'yesno'
    if qtype == 'exist':
        present = {(t['color'], t['kind']) for t in shapes}
        if rng.random() < 0.5:
            c, k = s['color'], s['kind']
        else:
            absent = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
            c, k = _pick(rng, absent)
        return f'is there a {c} {k}?', 'yes' if (c, k) in present else 'no', 'yesno'
    raise ValueError(qtype)


def vqa_items(rng, scenes, qid_start, with_vg=0.0):
    items, vg = [], []
    qid = qid_start
    for sc in scenes:
        extra = choose(rng, ['shape', 'size', 'position', 'exist'], 2)
        for qtype in ['color', 'count'] + extra:
            q = vqa_question(rng, sc, qtype) or vqa_question(rng, sc, 'exist')
            question, answer, atype = q
            items.append({'dataset': 'vqa', 'image': sc['image'], 'question': question,
                          'answer': _noisy_answers(rng, answer, atype), 'question_id': qid})
            qid += 1
        if with_vg and rng.random() < with_vg:
            question, answer, _ = vqa_question(rng, sc, _pick(rng, ['color', 'shape', 'size', 'count']))
            vg.append({'dataset': 'vg', 'image': sc['image'], 'question': question, 'answer': answer})
    return items, vg, qid


# ----------------------------------------------------------------------------- SNLI-VE
def ve_items(rng, scenes):
    items = []
    for sc in scenes:
        shapes = sc['shapes']
        image_id = os.path.splitext(sc['image'])[0]
        present = {(t['color'], t['kind']) for t in shapes}
        for label in ('entailment', 'contradiction', 'neutral'):
            s = _pick(rng, shapes)
            form = int(rng.integers(2))
            if label == 'neutral':
                c, k = _pick(rng, [(c, k) for c in COLORS for k in KINDS if (c, k) not in present])
                np_ = render_np(unique_attrs(s, shapes))
                sent = (f'there may be a {c} {k} behind {np_}' if form == 0
                        else f'a {c} {k} may be behind {np_}')
            else:
                if label == 'entailment':
                    color = s['color']
                    if rng.random() < 0.25:  # a count statement, also entailed
                        n = len(shapes)
                        items.append({'image': image_id, 'label': label,
                                      'sentence': 'there is one shape' if n == 1
                                      else f'there are {count_phrase(n)}'})
                        continue
                else:
                    color = None
                    wrong = [c for c in COLORS if c != s['color']]
                    if form == 0:  # no shape of that colour and kind on that side may exist
                        wrong = [c for c in wrong if not any(
                            _matches(t, {'color': c, 'kind': s['kind'], 'h': s['h']}) for t in shapes)]
                    color = _pick(rng, wrong)
                if form == 0:
                    sent = f"there is a {color} {s['kind']} on the {s['h']}"
                else:
                    sent = f"{render_np(unique_attrs(s, shapes, ('color',)))} is {color}"
            items.append({'image': image_id, 'sentence': sent, 'label': label})
    return items


# ----------------------------------------------------------------------------- NLVR2
def _nlvr_statement(rng):
    """A random statement about an image pair (left = images[0], right = images[1]), drawn from the
    words alone: returns (sentence, truth), truth being a function of the (left, right) scenes.

    Every statement is true more often the more of what it names the images hold. Statements
    whose truth falls as an attribute appears ("neither image contains ...", "exactly one image
    contains ...") are left out on purpose: mixed with these, their labels cancel out any single
    image feature, and the tiny demo model then learns nothing in a short fine-tuning."""
    color, kind = _pick(rng, list(COLORS)), _pick(rng, KINDS)
    side = int(rng.integers(2))
    name = ('left', 'right')[side]

    def has(scene, **attrs):
        return any(_matches(s, attrs) for s in scene['shapes'])

    t = int(rng.integers(5))
    if t == 0:
        return f'both images contain a {color} shape', lambda a, b: has(a, color=color) and has(b, color=color)
    if t == 1:
        return f'both images contain a {kind}', lambda a, b: has(a, kind=kind) and has(b, kind=kind)
    if t == 2:
        return (f'at least one image contains a {color} {kind}',
                lambda a, b: has(a, color=color, kind=kind) or has(b, color=color, kind=kind))
    if t == 3:
        return f'the {name} image contains a {color} {kind}', lambda a, b: has((a, b)[side], color=color, kind=kind)
    return f'the {name} image contains a {color} shape', lambda a, b: has((a, b)[side], color=color)


def nlvr_items(rng, scenes, n_items, tries=1000):
    """NLVR2 items whose label cannot be read from the words: each statement is drawn first,
    then its label (True or False, half each), then a random image pair that gives that label."""
    items = []
    while len(items) < n_items:
        sentence, truth = _nlvr_statement(rng)
        target = bool(rng.random() < 0.5)
        for _ in range(tries):
            i, j = (int(x) for x in rng.choice(len(scenes), 2, replace=False))
            if truth(scenes[i], scenes[j]) == target:
                items.append({'images': [scenes[i]['image'], scenes[j]['image']], 'sentence': sentence,
                              'label': str(target)})
                break
    return items


# ----------------------------------------------------------------------------- RefCOCO+
def referring_expressions(s, shapes):
    """Two distinct referring expressions (short, then long) for shape s."""
    short = render_np(unique_attrs(s, shapes))
    full = {k: s[k] for k in ('size', 'color', 'kind', 'h')}
    if sum(_matches(t, full) for t in shapes) != 1:
        full['v'] = s['v']
    long_ = render_np(full)
    if long_ == short:
        full['v'] = s['v']
        long_ = render_np(full)
    return [short, long_]


def grounding_data(rng, pools, size):
    images, anns, refs, dets = [], [], [], {}
    items = {'train': [], 'val': [], 'test': []}
    ref_id = sent_id = 0
    for pool_name, scenes in pools:
        for sc in scenes:
            shapes = sc['shapes']
            if len(shapes) < 2:
                continue
            split = pool_name if pool_name != 'test' else ('testA' if len(shapes) == 2 else 'testB')
            images.append({'id': sc['image_id'], 'file_name': sc['image'], 'height': size, 'width': size})
            boxes = []
            for s in shapes:
                x, y, w, h = s['bbox']
                anns.append({'id': s['ann_id'], 'image_id': sc['image_id'], 'bbox': [x, y, w, h],
                             'category_id': CATEGORY_IDS[s['kind']], 'area': w * h, 'iscrowd': 0})
                boxes.append([float(x), float(y), float(w), float(h), round(float(rng.uniform(0.6, 1.0)), 3)])
                sentences, sids = [], []
                for text in referring_expressions(s, shapes):
                    sentences.append({'sent': text, 'raw': text[0].upper() + text[1:] + '.',
                                      'tokens': text.split(), 'sent_id': sent_id})
                    sids.append(sent_id)
                    sent_id += 1
                    item = {'image': sc['image'], 'text': text, 'ref_id': ref_id}
                    if pool_name == 'train':
                        item['image_id'] = sc['image_id']
                    items[pool_name].append(item)
                refs.append({'ref_id': ref_id, 'ann_id': s['ann_id'], 'image_id': sc['image_id'],
                             'split': split, 'sentences': sentences, 'sent_ids': sids,
                             'category_id': CATEGORY_IDS[s['kind']], 'file_name': sc['image']})
                ref_id += 1
            for _ in range(int(rng.integers(2, 4))):  # distractor boxes
                w = float(round(rng.uniform(0.1, 0.4) * size))
                h = float(round(rng.uniform(0.1, 0.4) * size))
                x = float(round(rng.uniform(0, size - w)))
                y = float(round(rng.uniform(0, size - h)))
                boxes.append([x, y, w, h, round(float(rng.uniform(0.3, 0.9)), 3)])
            dets[str(sc['image_id'])] = [boxes[int(k)] for k in rng.permutation(len(boxes))]
    instances = {'images': images, 'annotations': anns,
                 'categories': [{'id': CATEGORY_IDS[k], 'name': k, 'supercategory': 'shape'} for k in KINDS]}
    return refs, instances, dets, items


# ----------------------------------------------------------------------------- vocabulary
_TOKEN_RE = re.compile(r'[a-z0-9]+|[^\sa-z0-9]')


def basic_tokens(text):
    """BERT-style basic tokenisation of our (ASCII) texts: lowercase, punctuation split."""
    text = text.replace('[SEP]', ' ')
    return _TOKEN_RE.findall(text.lower())


def build_vocab(texts):
    toks = set()
    for t in texts:
        toks.update(basic_tokens(t))
    punct = sorted(t for t in toks if not t.isalnum())
    words = sorted(t for t in toks if t.isalnum())
    return SPECIAL_TOKENS + punct + words


def all_texts(data):
    """Every text of every file (captions, questions, answers, sentences, expressions)."""
    out = list(ANSWER_LIST)
    for it in data['pretrain.json']:
        out += it['caption']
    for name in ('retrieval_train.json', 'retrieval_val.json', 'retrieval_test.json'):
        for it in data[name]:
            out += it['caption'] if isinstance(it['caption'], list) else [it['caption']]
    for name in ('vqa_train.json', 'vqa_val.json', 'vqa_test.json', 'vg_train.json'):
        for it in data[name]:
            out.append(it['question'])
            out += it['answer'] if isinstance(it['answer'], list) else [it['answer']]
    for name in ('ve_train.json', 've_dev.json', 've_test.json',
                 'nlvr_train.json', 'nlvr_dev.json', 'nlvr_test.json'):
        out += [it['sentence'] for it in data[name]]
    for ref in data['refs']:
        for s in ref['sentences']:
            out += [s['sent'], s['raw']]
    return out


# ----------------------------------------------------------------------------- classification
# prompt templates in the words of the pre-training captions ("there is a large red circle")
CLASSIFY_TEMPLATES = ('a {}', 'there is a {}', 'there is a small {}', 'there is a large {}', 'one shape: a {}')


def classification_set(out, seed, size, scale):
    """classify/<color>_<kind>/<nnn>.png: scenes of one shape each, drawn apart from the pools (a
    generator of their own), per_class of each of the 18 classes; classify/templates.txt holds
    prompt templates in the captions' words. Returns the number of images per class."""
    rng = np.random.default_rng([seed, 25])
    per_class = max(2, int(round(10 * scale)))
    folder = os.path.join(out, 'classify')
    for color in COLORS:
        for kind in KINDS:
            os.makedirs(os.path.join(folder, f'{color}_{kind}'), exist_ok=True)
            for i in range(per_class):
                scene = make_scene(rng, 1, size)
                scene['shapes'][0].update(color=color, kind=kind)
                render_scene(scene, size).save(os.path.join(folder, f'{color}_{kind}', f'{i:03d}.png'))
    with open(os.path.join(folder, 'templates.txt'), 'w') as f:
        f.write(''.join(t + '\n' for t in CLASSIFY_TEMPLATES))
    return per_class


# ----------------------------------------------------------------------------- main
def generate(out, seed=0, size=64, scale=1.0):
    """Write the demo world into ``out``; returns the manifest (world.json contents)."""
    if size < 32:
        raise ValueError('--size must be at least 32')
    rng = np.random.default_rng(seed)
    n_train = max(12, int(round(600 * scale)))
    n_eval = max(6, int(round(100 * scale)))
    img_dir = os.path.join(out, 'images')
    os.makedirs(img_dir, exist_ok=True)

    # scenes ---------------------------------------------------------------
    pools, all_scenes = [], []
    image_id, ann_id = 1, 1
    for split, n in (('train', n_train), ('val', n_eval), ('test', n_eval)):
        counts = rng.permutation(np.tile([1, 2, 3], n // 3 + 1)[:n])
        scenes = []
        for i in range(n):
            sc = make_scene(rng, int(counts[i]), size)
            name = f'{split}_{i:05d}'
            img = render_scene(sc, size)
            img.save(os.path.join(img_dir, name + '.png'))
            img.save(os.path.join(img_dir, name + '.jpg'), quality=95)
            shapes = []
            for s in sc['shapes']:
                shapes.append({'color': s['color'], 'rgb': list(COLORS[s['color']]), 'kind': s['kind'],
                               'size': s['size'], 'h': s['h'], 'v': s['v'], 'center': s['center'],
                               'bbox': s['bbox'], 'ann_id': ann_id})
                ann_id += 1
            g = sc['background']
            scenes.append({'image': name + '.png', 'image_id': image_id, 'split': split, 'width': size,
                           'height': size, 'background': [g, g, g], 'shapes': shapes})
            image_id += 1
        pools.append((split, scenes))
        all_scenes += scenes
    train, val, test = (p[1] for p in pools)

    data = {}
    # pre-training and retrieval --------------------------------------------
    train_captions = own_captions(train)
    data['pretrain.json'] = [{'image': os.path.join(out, 'images', sc['image']),
                              'caption': choose(rng, scene_captions(sc), 5)} for sc in train]
    data['retrieval_train.json'] = [{'image': sc['image'], 'caption': c, 'image_id': os.path.splitext(sc['image'])[0]}
                                    for sc, caps in zip(train, train_captions) for c in pick_captions(rng, *caps, 3)]
    for name, scenes in (('retrieval_val.json', val), ('retrieval_test.json', test)):
        data[name] = []
        for sc, own in zip(scenes, own_captions(scenes)):
            caps = pick_captions(rng, *own, 5, exactly=True)
            while len(caps) < 5:  # never with the current templates; keep the format anyway
                caps.append(caps[len(caps) % len(caps)])
            data[name].append({'image': sc['image'], 'caption': caps})

    # VQA ---------------------------------------------------------------------
    data['vqa_train.json'], data['vg_train.json'], qid = vqa_items(rng, train, 1, with_vg=0.1)
    data['vqa_val.json'], _, qid = vqa_items(rng, val, qid)
    data['vqa_test.json'], _, qid = vqa_items(rng, test, qid)
    data['answer_list.json'] = list(ANSWER_LIST)

    # SNLI-VE and NLVR2 ----------------------------------------------------------
    data['ve_train.json'] = ve_items(rng, train)
    data['ve_dev.json'] = ve_items(rng, val)
    data['ve_test.json'] = ve_items(rng, test)
    data['nlvr_train.json'] = nlvr_items(rng, train, 2 * n_train)
    data['nlvr_dev.json'] = nlvr_items(rng, val, 2 * n_eval)
    data['nlvr_test.json'] = nlvr_items(rng, test, 2 * n_eval)

    # RefCOCO+ grounding --------------------------------------------------------
    refs, instances, dets, gitems = grounding_data(rng, pools, size)
    data['grounding_train.json'] = gitems['train']
    data['grounding_val.json'] = gitems['val']
    data['grounding_test.json'] = gitems['test']
    data['refs'] = refs

    # vocabulary -----------------------------------------------------------------
    vocab = build_vocab(all_texts(data))

    # write ------------------------------------------------------------------------
    def dump(rel, obj):
        path = os.path.join(out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            f.write(json.dumps(obj))  # one C-encoder call: much faster than json.dump

    for name, obj in data.items():
        if name != 'refs':
            dump(name, obj)
    dump('scenes.json', all_scenes)
    dump(os.path.join('refcoco+', 'instances.json'), instances)
    dump(os.path.join('refcoco+', 'dets.json'), dets)
    dump(os.path.join('refcoco+', 'cocos.json'), dets)
    with open(os.path.join(out, 'refcoco+', 'refs(unc).p'), 'wb') as f:
        pickle.dump(refs, f, protocol=4)
    os.makedirs(os.path.join(out, 'text_encoder'), exist_ok=True)
    with open(os.path.join(out, 'text_encoder', 'vocab.txt'), 'w') as f:
        f.write(''.join(t + '\n' for t in vocab))
    dump(os.path.join('text_encoder', 'tokenizer_config.json'),
         {'do_lower_case': True, 'tokenizer_class': 'BertTokenizer'})

    n_shards = write_shards(out, data['pretrain.json'])
    per_class = classification_set(out, seed, size, scale)

    ref_splits = {}
    for r in refs:
        ref_splits[r['split']] = ref_splits.get(r['split'], 0) + 1
    files = {name: len(obj) for name, obj in data.items() if name != 'refs'}
    files.update({'scenes.json': len(all_scenes), 'refcoco+/refs(unc).p': len(refs),
                  'refcoco+/instances.json': {'images': len(instances['images']),
                                              'annotations': len(instances['annotations'])},
                  'refcoco+/dets.json': len(dets), 'text_encoder/vocab.txt': len(vocab),
                  'shards': {'shards': n_shards, 'samples': len(data['pretrain.json'])},
                  'classify': {'classes': len(COLORS) * len(KINDS), 'images_per_class': per_class}})
    manifest = {
        'name': 'ALBEF demo world', 'seed': seed, 'size': size, 'scale': scale,
        'images': {'train': n_train, 'val': n_eval, 'test': n_eval, 'formats': ['png', 'jpg']},
        'image_root': os.path.join(out, 'images'),
        'files': files,
        'ref_splits': ref_splits,
        'vocab_size': len(vocab),
        'words': [t for t in vocab if t.isalnum()],
        'colors': {k: list(v) for k, v in COLORS.items()},
        'kinds': list(KINDS), 'sizes': list(SIZES), 'positions': list(HPOS + VPOS),
        'answer_list': list(ANSWER_LIST),
    }
    dump('world.json', manifest)
    with open(os.path.join(out, 'README.txt'), 'w') as f:
        f.write(_readme(manifest))
    return manifest


SHARDS = 6


def write_shards(out, items, n_shards=SHARDS):
    """The pre-training items as `n_shards` tar shards written by webdataset's own ShardWriter
    (fixed mtime: the same bytes every time); returns the number of shards."""
    import webdataset as wds
    folder = os.path.join(out, 'shards')
    os.makedirs(folder, exist_ok=True)
    per_shard = -(-len(items) // n_shards)
    with wds.ShardWriter(os.path.join(folder, '%06d.tar'), maxcount=per_shard, verbose=0, mtime=0) as sink:
        for item in items:
            with open(item['image'], 'rb') as f:
                png = f.read()
            sink.write({'__key__': os.path.splitext(os.path.basename(item['image']))[0], 'png': png,
                        'txt': item['caption'][0], 'json': {'captions': item['caption'], 'image': item['image']}})
        return sink.shard


def _readme(m):
    files = '\n'.join(f'  {k:32s} {v}' for k, v in m['files'].items())
    return f"""ALBEF demo world (generated by `python -m dataset.toy`, seed {m['seed']}, size {m['size']},
scale {m['scale']}).

Synthetic scenes: {m['size']}x{m['size']} images, plain grey background, 1-3 shapes, one per
quadrant. Each shape has a colour ({', '.join(m['colors'])}), a kind ({', '.join(m['kinds'])}),
a size (small, large) and a position (left/right, top/bottom). Every text is true of its
image; scenes.json holds the ground truth (attributes, boxes, centre pixels).

Images: images/<split>_<n>.png (and .jpg for SNLI-VE), splits train {m['images']['train']},
val {m['images']['val']}, test {m['images']['test']}. image_root / vqa_root / vg_root:
{m['image_root']}. Grounding: refcoco_data = the folder of this file, det_file
refcoco+/dets.json, coco_file refcoco+/cocos.json. Text encoder vocabulary:
text_encoder/ ({m['vocab_size']} tokens; set vocab_size in the BERT config to it).

Files and item counts:
{files}

See the docstring of dataset/toy.py for the formats and the design of each task.
"""


def main(argv=None):
    p = argparse.ArgumentParser(description='Write the synthetic ALBEF demo world.')
    p.add_argument('--out', default='data/demo', help='output folder (default data/demo)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--size', type=int, default=64, help='image side in pixels (default 64)')
    p.add_argument('--scale', type=float, default=1.0, help='multiplies every count (default 1.0)')
    args = p.parse_args(argv)
    t0 = time.time()
    m = generate(args.out, seed=args.seed, size=args.size, scale=args.scale)
    dt = time.time() - t0
    f = m['files']
    print(f"demo world written to {args.out} in {dt:.1f}s (seed {args.seed}, size {args.size}, "
          f"scale {args.scale})")
    print(f"  images train/val/test {m['images']['train']}/{m['images']['val']}/{m['images']['test']}; "
          f"pretrain {f['pretrain.json']}, retrieval train {f['retrieval_train.json']}, "
          f"vqa train {f['vqa_train.json']} (+{f['vg_train.json']} vg), ve train {f['ve_train.json']}, "
          f"nlvr train {f['nlvr_train.json']}, refs {f['refcoco+/refs(unc).p']}; "
          f"vocab {m['vocab_size']} tokens")
    return m


if __name__ == '__main__':
    main()
