"""Zero-shot image classification with ALBEF's ITC space, optionally re-ranked by ITM.

    m = models.load('ALBEF')
    m.classify('photo.jpg', ['dog', 'cat', 'car'], k=2)      # [Prediction(classes=['dog', 'cat'], probs=...)]
    python -m models.zeroshot --checkpoint ALBEF --data DIR [--templates FILE] [--rerank N] [--out result.json]

Each class embedding is CLIP's prompt ensemble: the class name put into every template ("a photo
of a {}."), each text's normalised ITC embedding, their mean, normalised again. An image's score for
a class is the cosine of the two embeddings; its probabilities are the softmax of the cosines over
the classes divided by the model's temperature (as in the ITC loss). With `rerank=R` the R best
classes by ITC are scored again by the ITM head, each by its match probability averaged over the
templates (R x templates fusion passes per image), and put first in that order: the re-ranking of
ALBEF's retrieval evaluation. The default templates are CLIP's 80 for ImageNet (`TEMPLATES`).

The command evaluates a folder of class folders (torchvision's ImageFolder layout; a folder name's
underscores become spaces in the class name), prints top-1, top-5 and per-class accuracy beside
chance, and writes them as JSON.
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from configuration import one_line
from dataset.utils import CAPTION_WORDS
from .api import load
from .checkpoint import CheckpointError
from .loaded import _as_list
from .retrieval_eval import image_features, itm_logits, text_features

# CLIP's 80 prompt templates for ImageNet (Radford et al. 2021, its prompt-engineering notebook)
TEMPLATES = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
    'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.',
    'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
    'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.',
    'a photo of a {}.', 'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.',
    'a origami {}.', 'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
    'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.',
    'a embroidered {}.', 'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
    'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
    'a photo of a small {}.', 'a tattoo of the {}.',
)


@dataclass
class Prediction:
    """One image's k best classes, best first: `probs` the ITC probabilities (softmax over all the
    classes), `similarities` the ITC cosines, `itm` the ITM match probabilities of the re-ranked
    classes (None for the others, and for all without re-ranking)."""
    classes: list
    probs: list
    similarities: list
    itm: list


def read_templates(templates=None):
    """A list of templates, each with one '{}': CLIP's by default, a list, or a text file of one
    template per line (blank lines and lines starting with # skipped)."""
    if templates is None:
        return list(TEMPLATES)
    source = None
    if isinstance(templates, (str, os.PathLike)):
        source = os.fspath(templates)
        if not os.path.isfile(source):
            raise FileNotFoundError(f'templates file not found: {source}')
        with open(source, encoding='utf-8') as f:
            templates = [line.strip() for line in f if line.strip() and not line.lstrip().startswith('#')]
    templates = list(templates)
    where = f' in {source}' if source else ''
    if not templates:
        raise ValueError(f'no templates{where}: give at least one, e.g. "a photo of a {{}}."')
    for template in templates:
        if not isinstance(template, str) or template.count('{}') != 1:
            raise ValueError(f'template {template!r}{where} must hold the class name\'s place "{{}}" exactly once')
    return templates


def check_classes(class_names):
    names = [class_names] if isinstance(class_names, str) else list(class_names)
    if not names or any(not isinstance(n, str) or not n.strip() for n in names):
        raise ValueError(f'class names must be non-empty strings, got {names!r}')
    if len(set(names)) != len(names):
        raise ValueError(f'class names must differ: {sorted({n for n in names if names.count(n) > 1})} repeat')
    return names


def prompts(class_names, templates):
    """Every class in every template, class by class: C * T texts."""
    return [t.replace('{}', name) for name in class_names for t in templates]


def class_embeddings(loaded, class_names, templates=None, batch_size=256, progress=False):
    """(C, embed_dim): each class's ITC text embeddings over the templates, averaged, normalised."""
    names, templates = check_classes(class_names), read_templates(templates)
    texts = loaded.embed_texts(prompts(names, templates), batch_size=batch_size, progress=progress)
    return F.normalize(texts.view(len(names), len(templates), -1).mean(1), dim=-1)


def temperature(loaded):
    return float(loaded.model.temp.detach().clamp(0.001, 0.5))


@torch.no_grad()
def itm_probabilities(loaded, image_feats, texts_per_class, candidates, batch_size=64):
    """(N, R): ITM match probability of image n with class candidates[n, r], averaged over that
    class's texts (`texts_per_class[c]`, one per template); `image_feats` (N, patches, D) from the ViT."""
    classes = candidates.unique().tolist()
    texts = loaded._texts([t for c in classes for t in texts_per_class[c]])
    text_feats, _, text_atts = text_features(loaded.model, texts, loaded.tokenizer, loaded.device,
                                             max_length=CAPTION_WORDS)
    per_class = len(texts_per_class[classes[0]])
    row = {c: i for i, c in enumerate(classes)}
    # pair p: image pair_image[p] with text pair_text[p]; every (image, candidate, template)
    n, r = candidates.shape
    image_index = torch.arange(n).repeat_interleave(r * per_class)
    text_index = torch.tensor([row[c] * per_class + t for c in candidates.reshape(-1).tolist()
                               for t in range(per_class)], dtype=torch.long)
    probs = torch.empty(len(image_index))
    for s in range(0, len(image_index), batch_size):
        i, t = image_index[s:s + batch_size].to(loaded.device), text_index[s:s + batch_size].to(loaded.device)
        logits = itm_logits(loaded.model, image_feats, text_feats[t], text_atts[t], image_index=i)
        probs[s:s + batch_size] = F.softmax(logits.float(), dim=1)[:, 1].cpu()
    return probs.view(n, r, per_class).mean(-1)


def rank(loaded, images, class_embeds, texts_per_class, rerank=0):
    """For a (N, 3, H, W) batch: (order (N, C) of the class indices, best first; similarities (N, C);
    probs (N, C); itm (N, C), NaN where not re-ranked)."""
    with torch.no_grad():
        image_feats, image_embeds = image_features(loaded.model, images.to(loaded.device))
    sims = image_embeds.float().cpu() @ class_embeds.T
    probs = F.softmax(sims / temperature(loaded), dim=1)
    order = sims.argsort(dim=1, descending=True, stable=True)
    itm = torch.full_like(sims, float('nan'))
    r = min(int(rerank), sims.size(1))
    if r > 0:
        candidates = order[:, :r]
        scores = itm_probabilities(loaded, image_feats, texts_per_class, candidates)
        itm.scatter_(1, candidates, scores)
        order[:, :r] = candidates.gather(1, scores.argsort(dim=1, descending=True, stable=True))
    return order, sims, probs, itm


def _batches(loaded, images, batch_size):
    images = _as_list(images)
    for s in range(0, len(images), batch_size):
        yield loaded._images(images[s:s + batch_size])


def classify(loaded, images, class_names, templates=None, k=5, rerank=0, batch_size=64, progress=False):
    """Zero-shot classification of `images` (PIL images, paths, uint8 arrays or a transformed batch)
    among `class_names`; one `Prediction` with the k best classes per image (see the module docstring)."""
    loaded._need('embed')
    names, templates = check_classes(class_names), read_templates(templates)
    class_embeds = class_embeddings(loaded, names, templates, progress=progress)
    texts_per_class = [prompts([name], templates) for name in names]
    k = max(1, min(int(k), len(names)))
    results = []
    for batch in _batches(loaded, images, batch_size):
        order, sims, probs, itm = rank(loaded, batch, class_embeds, texts_per_class, rerank)
        for o, s, p, m in zip(order[:, :k].tolist(), sims.tolist(), probs.tolist(), itm.tolist()):
            results.append(Prediction([names[c] for c in o], [p[c] for c in o], [s[c] for c in o],
                                      [None if m[c] != m[c] else m[c] for c in o] if rerank else None))
    return results


# ---- evaluation on a folder of class folders ----------------------------------------------------------
def evaluate(loaded, folder, templates=None, rerank=0, batch_size=64, progress=True):
    """Top-1, top-5 and per-class top-1 accuracy (in %) on an ImageFolder tree, with chance levels."""
    from torchvision.datasets import ImageFolder
    try:
        data = ImageFolder(folder)
    except (FileNotFoundError, OSError) as error:
        raise FileNotFoundError(f'{folder}: {one_line(error)} (expected one folder of images '
                                f'per class)') from None
    names = [c.replace('_', ' ') for c in data.classes]
    templates = read_templates(templates)
    class_embeds = class_embeddings(loaded, names, templates, progress=progress)
    texts_per_class = [prompts([name], templates) for name in names]
    paths, labels = zip(*data.samples)
    labels = torch.tensor(labels)
    top5 = min(5, len(names))
    hits1, hits5 = [], []
    from tqdm import tqdm
    for s in tqdm(range(0, len(paths), batch_size), desc='images', disable=not progress, leave=False):
        images = loaded._images(list(paths[s:s + batch_size]))
        order = rank(loaded, images, class_embeds, texts_per_class, rerank)[0]
        truth = labels[s:s + batch_size, None]
        hits1.append(order[:, :1] == truth)
        hits5.append((order[:, :top5] == truth).any(1, keepdim=True))
    hits1, hits5 = torch.cat(hits1)[:, 0].float(), torch.cat(hits5)[:, 0].float()
    per_class = {name: {'images': int((labels == c).sum()), 'top1': _pct(hits1[labels == c].mean())}
                 for c, name in enumerate(names)}
    return {'data': folder, 'images': len(paths), 'classes': len(names), 'templates': len(templates),
            'rerank': int(rerank), 'top1': _pct(hits1.mean()), 'top5': _pct(hits5.mean()),
            'mean_per_class_top1': _pct(torch.tensor([v['top1'] for v in per_class.values()]).mean() / 100),
            'chance_top1': _pct(torch.tensor(1 / len(names))), 'chance_top5': _pct(torch.tensor(top5 / len(names))),
            'per_class': per_class}


def _pct(x):
    return round(100 * float(x), 2)


def report(result):
    lines = [f"zero-shot classification of {result['data']}: {result['images']} images, {result['classes']} "
             f"classes, {result['templates']} templates" + (f", ITM re-ranks the best {result['rerank']}"
                                                             if result['rerank'] else ''),
             f"top-1 {result['top1']:.2f} (chance {result['chance_top1']:.2f})   top-5 {result['top5']:.2f} "
             f"(chance {result['chance_top5']:.2f})   mean per-class top-1 {result['mean_per_class_top1']:.2f}",
             'per class (top-1):']
    width = max(len(name) for name in result['per_class'])
    lines += [f"  {name:{width}s} {v['top1']:6.2f}  ({v['images']} images)" for name, v in result['per_class'].items()]
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m models.zeroshot', description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', required=True, help='a pre-training or retrieval checkpoint: a .pth, an '
                                                            'export directory or a released name (ALBEF, mscoco, ...)')
    parser.add_argument('--data', required=True, help='a folder of class folders of images (ImageFolder layout)')
    parser.add_argument('--templates', help="a text file of prompt templates, one per line, '{}' for the class "
                                            "name (default: CLIP's 80 ImageNet templates)")
    parser.add_argument('--rerank', type=int, default=0, help='re-rank the best N classes by ITM (default 0: off)')
    parser.add_argument('--out', help='write the result as JSON to this file')
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--device', default=None, help='cuda or cpu (default: cuda when present)')
    parser.add_argument('--text_encoder', default=None, help='tokenizer, when the checkpoint does not name one')
    parser.add_argument('--trust_checkpoint', action='store_true',
                        help='allow unpickling Python objects from a checkpoint you trust')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    args = parser.parse_args(argv)
    try:
        if not os.path.isdir(args.data):
            raise FileNotFoundError(f'--data {args.data}: not a directory')
        if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise FileNotFoundError(f'--out {args.out}: its folder does not exist')
        templates = read_templates(args.templates) if args.templates else None
        loaded = load(args.checkpoint, device=args.device, text_encoder=args.text_encoder,
                      trust_checkpoint=args.trust_checkpoint)
        loaded._need('embed')
        result = evaluate(loaded, args.data, templates, args.rerank, args.batch_size, progress=not args.quiet)
    except (CheckpointError, ValueError, OSError) as error:  # TaskError is a ValueError
        print(f'error: {one_line(error)}', file=sys.stderr, flush=True)
        return 2
    result = {'checkpoint': args.checkpoint, **result}
    print(report(result))
    if args.out:
        tmp = f'{args.out}.tmp{os.getpid()}'
        with open(tmp, 'w') as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
        print(f'result written to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
