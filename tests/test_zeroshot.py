"""Zero-shot classification (models/zeroshot.py, LoadedModel.classify): class embeddings, ITC
probabilities and ITM re-ranking against direct computations on a tiny random-weight model;
`python -m models.zeroshot` on a folder of class folders; the demo world's classification set."""
import glob
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_CONFIG
from dataset.utils import pre_caption
from models import api, zeroshot

CLASSES = ['red circle', 'blue square', 'green triangle', 'white circle']
TEMPLATES = ['a {}', 'there is a {}', 'one shape: a {} on the left']


@pytest.fixture(scope='module')
def loaded(tokenizer):
    from conftest import build_model
    torch.manual_seed(0)
    model = build_model('retrieval', tokenizer, dict(TINY_CONFIG))
    for weight in model.parameters():  # far from BERT's init, where every text's embedding is about the same
        if weight.dim() >= 2:            # (cosines of 0.9999), which would hide a wrong average
            weight.data.normal_(0, 0.2)
    return api.LoadedModel(model.eval(), 'retrieval', dict(TINY_CONFIG), tokenizer, torch.device('cpu'))


@pytest.fixture(scope='module')
def images(demo_world):
    """Two one-shape scenes of each class of CLASSES from the demo world's classification set."""
    return sorted(p for c in CLASSES for p in glob.glob(os.path.join(demo_world, 'classify', c.replace(' ', '_'),
                                                                      '*.png')))


@torch.no_grad()
def direct_text_embedding(loaded, text):
    tokens = loaded.tokenizer([pre_caption(text, 30)], return_tensors='pt')
    cls = loaded.model.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask,
                                    mode='text').last_hidden_state[:, 0]
    return F.normalize(loaded.model.text_proj(cls), dim=-1)[0]


@torch.no_grad()
def direct_image_embedding(loaded, path):
    image = loaded.transform(Image.open(path).convert('RGB'))[None]
    return F.normalize(loaded.model.vision_proj(loaded.model.visual_encoder(image)[:, 0]), dim=-1)[0]


def test_class_embeddings_average_the_normalised_template_embeddings(loaded):
    expected = torch.stack([F.normalize(torch.stack([direct_text_embedding(loaded, t.replace('{}', c))
                                                     for t in TEMPLATES]).mean(0), dim=0) for c in CLASSES])
    got = zeroshot.class_embeddings(loaded, CLASSES, TEMPLATES)
    assert got.shape == (4, TINY_CONFIG['embed_dim'])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(4))
    one = zeroshot.class_embeddings(loaded, CLASSES, ['{}'])  # one template: the class name's own embedding
    torch.testing.assert_close(one, loaded.embed_texts(CLASSES))


def test_scores_are_itc_cosines_and_their_softmax_over_the_temperature(loaded, images):
    predictions = loaded.classify(images, CLASSES, TEMPLATES, k=len(CLASSES))
    classes = zeroshot.class_embeddings(loaded, CLASSES, TEMPLATES)
    assert len(predictions) == len(images) == 8
    for path, prediction in zip(images, predictions):
        sims = direct_image_embedding(loaded, path) @ classes.T
        probs = F.softmax(sims / 0.07, dim=0)
        order = sims.argsort(descending=True).tolist()
        assert prediction.classes == [CLASSES[i] for i in order] and prediction.itm is None
        np.testing.assert_allclose(prediction.similarities, sims[order].tolist(), atol=1e-5)
        np.testing.assert_allclose(prediction.probs, probs[order].tolist(), atol=1e-5)
    top2 = loaded.classify(images[0], CLASSES, TEMPLATES, k=2)[0]
    assert top2.classes == predictions[0].classes[:2] and top2.probs == pytest.approx(predictions[0].probs[:2])


def test_rerank_orders_the_best_itc_classes_by_their_itm_probability(loaded, images):
    plain = loaded.classify(images, CLASSES, TEMPLATES, k=4)
    reranked = loaded.classify(images, CLASSES, TEMPLATES, k=4, rerank=3)
    changed = 0
    for path, before, after in zip(images, plain, reranked):
        candidates = before.classes[:3]
        pairs = loaded.itm(path, [t.replace('{}', c) for c in candidates for t in TEMPLATES])  # LoadedModel.itm
        itm = dict(zip(candidates, pairs.view(3, len(TEMPLATES)).mean(1).tolist()))
        assert after.classes[:3] == sorted(candidates, key=lambda c: -itm[c])
        assert after.classes[3] == before.classes[3] and after.itm[3] is None  # not re-ranked: ITC order
        np.testing.assert_allclose(after.itm[:3], [itm[c] for c in after.classes[:3]], atol=1e-5)
        changed += after.classes != before.classes
    assert changed > 0  # the re-ranking did reorder something


def test_templates_default_list_file_and_bad_ones(tmp_path):
    assert len(zeroshot.TEMPLATES) == 80 == len(set(zeroshot.TEMPLATES))
    assert zeroshot.read_templates() == list(zeroshot.TEMPLATES)
    assert zeroshot.TEMPLATES[:2] == ('a bad photo of a {}.', 'a photo of many {}.')
    path = tmp_path / 'templates.txt'
    path.write_text('# mine\na {}\n\n  there is a {}  \n')
    assert zeroshot.read_templates(path) == ['a {}', 'there is a {}']
    path.write_text('a photo\n')
    with pytest.raises(ValueError, match=rf"^template 'a photo' in {path} must hold the class name's place "
                                         r'"\{\}" exactly once$'):
        zeroshot.read_templates(path)
    with pytest.raises(FileNotFoundError, match='^templates file not found: nowhere.txt$'):
        zeroshot.read_templates('nowhere.txt')
    with pytest.raises(ValueError, match=r"^class names must differ: \['cat'\] repeat$"):
        zeroshot.check_classes(['cat', 'dog', 'cat'])


def test_the_demo_world_classification_set(demo_world):
    from dataset import toy
    folder = os.path.join(demo_world, 'classify')
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    assert classes == sorted(f'{c}_{k}' for c in toy.COLORS for k in toy.KINDS)
    assert zeroshot.read_templates(os.path.join(folder, 'templates.txt')) == list(toy.CLASSIFY_TEMPLATES)
    fill = {'circle': np.pi / 4, 'square': 1.0, 'triangle': 0.5}  # shape area / box area
    for name in classes:
        color, kind = name.split('_')
        paths = sorted(glob.glob(os.path.join(folder, name, '*.png')))
        assert len(paths) == 2  # scale 0.1
        for path in paths:
            pixels = np.asarray(Image.open(path).convert('RGB')).astype(int)
            shape = (pixels == toy.COLORS[color]).all(-1)
            ys, xs = np.nonzero(shape)
            area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            assert abs(shape.sum() / area - fill[kind]) < 0.12, (path, shape.sum() / area)
            assert shape.sum() + (pixels == pixels[0, 0]).all(-1).sum() == 64 * 64  # one shape on grey


@pytest.fixture(scope='module')
def checkpoint(loaded, minilm_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp('zeroshot') / 'tiny.pth'
    torch.save({'model': loaded.model.state_dict(), 'config': {**TINY_CONFIG, 'text_encoder': minilm_dir},
                'epoch': 0}, path)
    return str(path)


def test_command_evaluates_a_folder_of_class_folders(loaded, checkpoint, images, tmp_path, capsys):
    data = tmp_path / 'data'
    for path in images:
        target = data / os.path.basename(os.path.dirname(path))
        target.mkdir(parents=True, exist_ok=True)
        os.link(path, target / os.path.basename(path))
    templates = tmp_path / 'templates.txt'
    templates.write_text('\n'.join(TEMPLATES))
    out = tmp_path / 'result.json'
    assert zeroshot.main(['--checkpoint', checkpoint, '--data', str(data), '--templates', str(templates),
                          '--out', str(out), '--quiet', '--device', 'cpu']) == 0
    result = json.loads(out.read_text())
    names = sorted(CLASSES)  # ImageFolder's order: folder names sorted
    paths = [p for name in names for p in images if f"/{name.replace(' ', '_')}/" in p]
    predictions = loaded.classify(paths, names, TEMPLATES, k=4)
    truth = [name for name in names for _ in range(2)]
    top1 = [p.classes[0] == t for p, t in zip(predictions, truth)]
    top4 = [t in p.classes for p, t in zip(predictions, truth)]
    assert result['top1'] == round(100 * np.mean(top1), 2) and result['top5'] == 100.0 == round(100 * np.mean(top4), 2)
    assert result['per_class'] == {n: {'images': 2, 'top1': 100 * np.mean(top1[2 * i:2 * i + 2])}
                                   for i, n in enumerate(names)}
    assert (result['images'], result['classes'], result['templates'], result['chance_top1'],
            result['chance_top5']) == (8, 4, 3, 25.0, 100.0)
    lines = capsys.readouterr().out.splitlines()
    lines = lines[[i for i, line in enumerate(lines) if line.startswith('zero-shot')][0]:]  # after the load report
    assert lines[0] == f'zero-shot classification of {data}: 8 images, 4 classes, 3 templates'
    assert lines[1].startswith(f"top-1 {result['top1']:.2f} (chance 25.00)   top-5 100.00 (chance 100.00)   "
                               f"mean per-class top-1 ")
    assert lines[-1] == f'result written to {out}'


@pytest.mark.parametrize('case', ['no data', 'no classes', 'bad templates', 'no checkpoint'])
def test_command_bad_input_one_line_exit_2(checkpoint, tmp_path, capsys, case):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'bad.txt').write_text('a photo\n')
    argv = {'no data': ['--data', str(tmp_path / 'nowhere')],
            'no classes': ['--data', str(tmp_path / 'empty')],
            'bad templates': ['--data', str(tmp_path / 'empty'), '--templates', str(tmp_path / 'bad.txt')],
            'no checkpoint': ['--data', str(tmp_path / 'empty'), '--checkpoint', 'ALBEF_9M']}[case]
    assert zeroshot.main(['--checkpoint', checkpoint, *argv, '--quiet', '--device', 'cpu']) == 2
    expected = {'no data': f'--data {tmp_path}/nowhere: not a directory',
                'no classes': f"{tmp_path}/empty: Couldn't find any class folder in {tmp_path}/empty. (expected one "
                              f"folder of images per class)",
                'bad templates': f'template \'a photo\' in {tmp_path}/bad.txt must hold the class name\'s place "{{}}" '
                                 f'exactly once',
                'no checkpoint': "'ALBEF_9M' is neither a file nor a released ALBEF name; the names are ALBEF, "
                                 "ALBEF_4M, mscoco, flickr30k, vqa, refcoco, pretrain_model_nlvr, data, json_pretrain "
                                 "(python -m models.fetch --list)"}[case]
    assert capsys.readouterr().err.splitlines() == [f'error: {expected}']
