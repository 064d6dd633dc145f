"""The Classify tab: zero-shot classification of an image among class names typed by the user
(`LoadedModel.classify`, models/zeroshot.py), with the prompt templates in a text box: the demo
world's (classify/templates.txt beside the served image folder) when there are some, else empty
for CLIP's 80 ImageNet templates."""
import os

import gradio as gr

from models.api import TaskError

from .app import _error, _rgb, image_input, run_on

CLASSIFY_TEXT = """**Classify**: zero-shot classification. Each class name is put into every prompt template
("a photo of a {}."), the texts' ITC embeddings are averaged into one per class, and the image's
probabilities are the softmax of its cosine with each class over the model's temperature. With
*re-rank by ITM*, the best classes by ITC are scored again by the image-text matching head (its match
probability averaged over the templates), put first in that order and shown with that probability;
the table keeps every score."""


def parse_classes(text):
    names = [n.strip() for n in (text or '').split(',') if n.strip()]
    if len(names) < 2:
        raise _error('type at least two class names separated by commas, e.g. "red circle, blue square"')
    return names


def parse_templates(text):
    templates = [t.strip() for t in (text or '').splitlines() if t.strip()]
    return templates or None  # none: CLIP's 80 ImageNet templates


def world_templates(folder):
    """The demo world's templates (classify/templates.txt beside its image folder), as text; '' if none."""
    path = os.path.join(os.path.dirname(os.path.abspath(folder)), 'classify', 'templates.txt') if folder else ''
    if not os.path.isfile(path):
        return ''
    with open(path, encoding='utf-8') as f:
        return f.read().strip()


def classify(models, image, classes, templates, k, rerank):
    """(the k best classes {name: ITC probability, or ITM probability when re-ranked (then only the
    re-ranked ones)}, rows [rank, class, probability, ITC, ITM] of all k)."""
    if models.model is None or models.model_note:
        raise _error(models.model_note or 'no retrieval or pre-training checkpoint is loaded')
    image, names = _rgb(image), parse_classes(classes)
    try:
        prediction = models.model.classify(image, names, parse_templates(templates), k=int(k), rerank=int(rerank))[0]
    except (TaskError, ValueError, OSError) as error:  # a template without {}, repeated names, ...
        raise _error(str(error)) from None
    rows = [[rank, name, round(p, 6), round(s, 6), None if m is None else round(m, 6)]
            for rank, (name, p, s, m) in enumerate(zip(prediction.classes, prediction.probs, prediction.similarities,
                                                       prediction.itm or [None] * len(names)), 1)]
    if prediction.itm is None:
        return dict(zip(prediction.classes, prediction.probs)), rows
    # re-ranked: the ITM probabilities, which set the order (the Label sorts by its numbers)
    return {name: m for name, m in zip(prediction.classes, prediction.itm) if m is not None}, rows


def classify_tab(models):
    """The tab, inside the app's gr.Blocks; its API endpoint is /classify."""
    with gr.Tab('Classify', id='classify'):
        gr.Markdown(CLASSIFY_TEXT + (f'\n\n> {models.model_note}' if models.model_note else ''))
        with gr.Row():
            with gr.Column(scale=1):
                image = image_input(type='pil', label='image', sources=['upload', 'clipboard'], height=260,
                                    elem_id='classify-image')
                classes = gr.Textbox(label='class names, separated by commas', elem_id='classify-classes',
                                     placeholder='e.g. red circle, blue square, green triangle')
                templates = gr.Textbox(label="prompt templates, one per line, {} for the class name (empty: CLIP's "
                                             "80 ImageNet templates)", value=world_templates(models.folder), lines=3,
                                       elem_id='classify-templates')
                with gr.Row():
                    k = gr.Slider(1, 10, value=5, step=1, label='top k')
                    rerank = gr.Slider(0, 10, value=0, step=1, label='re-rank the best N by ITM (0: off)')
                button = gr.Button('Classify', variant='primary', elem_id='classify-run',
                                   interactive=models.model is not None and not models.model_note)
            with gr.Column(scale=1):
                label = gr.Label(num_top_classes=10, label='classes (ITM probability when re-ranked)',
                                 elem_id='classify-label')
                table = gr.Dataframe(headers=['rank', 'class', 'probability', 'ITC', 'ITM'], label='scores',
                                     interactive=False, elem_id='classify-table')

        def run(image, classes, templates, k, rerank):
            return classify(models, image, classes, templates, k, rerank)
        run_on(run, button, classes, [image, classes, templates, k, rerank], [label, table], 'classify')
