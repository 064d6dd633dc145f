"""The Gradio app: four tabs on models loaded with `models.load` (all model work happens there).

* Look: ITM match probability, ITC similarity and Grad-CAM of an image and a caption (the whole
  caption's and each word's).
* Search: the folder's images ranked for a text by ITC, optionally re-ranked by ITM.
* Ask: the k best answers of a VQA checkpoint to a question about an image.
* Classify: zero-shot classification among typed class names (demo/classify.py).

Every handler turns bad input into a `gr.Error`: one line in the page (and an `AppError` carrying the
same line for gradio_client), never a stack trace. Uploaded and folder images are opened under
Pillow's own decompression-bomb guard (PIL.Image.MAX_IMAGE_PIXELS), which the project never changes.
"""
import os
import threading
from dataclasses import dataclass, field

import gradio as gr
import numpy as np
from PIL import Image

import tasks
from dataset.utils import CAPTION_WORDS, pre_caption, pre_question
from models import gradcam
from models.api import TaskError

from .index import IMAGE_EXTENSIONS, build_index

LOOK_TASKS = tasks.serving('gradcam')    # the checkpoints with ITC projections and an ITM head (tasks.py)
DISPLAY_SIZE = 256                       # smaller images are enlarged for the Grad-CAM panels


@dataclass
class DemoModels:
    """What the app serves. A tab whose model is missing or of another task shows its note instead."""
    model: object = None            # models.load result for Look and Search
    checkpoint: str = None
    model_note: str = ''
    vqa: object = None              # models.load result for Ask
    vqa_checkpoint: str = None
    vqa_note: str = ''
    folder: str = None              # Search's image folder
    folder_note: str = ''
    extensions: tuple = IMAGE_EXTENSIONS
    examples: list = field(default_factory=list)      # [[image path, caption]] or [[image path]] for Look
    vqa_examples: list = field(default_factory=list)  # [[image path, question]] for Ask


def look_model_note(loaded, checkpoint):
    """Why `loaded` cannot serve Look and Search ('' when it can)."""
    if loaded.task in LOOK_TASKS:
        return ''
    return (f"{checkpoint} is a '{loaded.task}' checkpoint; Look and Search need the ITC and ITM heads of a "
            f"retrieval or pre-training checkpoint (e.g. mscoco.pth, ALBEF.pth): pass one with --checkpoint")


def vqa_model_note(loaded, checkpoint):
    """Why `loaded` cannot serve Ask ('' when it can)."""
    if loaded.task == 'vqa' and not getattr(loaded, 'answer_list', None):
        return (f'{checkpoint} names no list of candidate answers: pass --answer_list answer_list.json (the '
                f'answers it was trained to rank)')
    if loaded.task == 'vqa':
        return ''
    return (f"{checkpoint} is a '{loaded.task}' checkpoint; answering questions needs a VQA checkpoint "
            f"(vqa.pth): pass one with --vqa_checkpoint")


def image_input(**kwargs):
    """gr.Image that answers an upload Pillow cannot read with one clear line, not Pillow's exception.

    (The instance's preprocess is wrapped rather than gr.Image subclassed: Gradio writes a .pyi stub
    next to the source of every Component subclass.)"""
    component = gr.Image(**kwargs)
    plain = component.preprocess

    def preprocess(payload):
        try:
            return plain(payload)
        except gr.Error:
            raise
        except Exception:
            name = getattr(payload, 'orig_name', None) or os.path.basename(getattr(payload, 'path', '') or '')
            raise _error(f'{name or "the upload"} is not an image that Pillow can read: upload a JPEG, PNG, '
                         f'WebP, ... file') from None
    component.preprocess = preprocess
    return component


def _error(message):
    return gr.Error(message, print_exception=False)


def _rgb(image):
    if image is None:
        raise _error('upload an image first (or pick one of the examples)')
    return image.convert('RGB')


def _caption(text, what='caption'):
    if text is None or not text.strip():
        wanted = 'what to search for' if what == 'text' else f'a {what}'
        raise _error(f'the {what} is empty: type {wanted} first')
    cleaned = pre_question(text) if what == 'question' else pre_caption(text, CAPTION_WORDS)
    if not cleaned.strip():
        raise _error(f'the {what} {text!r} has no words left after lowercasing and removing punctuation')
    return text


def _display(image):
    """The image enlarged (bicubic) so that its longer side is at least DISPLAY_SIZE pixels."""
    scale = DISPLAY_SIZE / max(image.size)
    if scale <= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)


def _uint8(rgb):
    return np.uint8(np.clip(np.round(rgb * 255), 0, 255))


class Handlers:
    """The three tabs' computations, callable without a browser (gradio's API calls these)."""

    def __init__(self, models):
        self.models = models
        self.lock = threading.Lock()  # the folder index is built by one search at a time
        self.index = None

    # ---- Look -----------------------------------------------------------------------------------
    def look(self, image, caption, block_num):
        m = self._look_model()
        image, caption = _rgb(image), _caption(caption)
        try:
            itm = float(m.itm(image, caption)[0])
            itc = float(m.similarity(image, caption)[0, 0])
            cam = m.gradcam(image, caption, block_num=int(block_num))
        except (TaskError, ValueError, OSError) as error:  # a task mismatch, a text or image it cannot use
            raise _error(str(error)) from None
        rgb = np.asarray(_display(image), dtype=np.float32) / 255
        panels = [(_uint8(rgb), 'image'), (_uint8(gradcam.overlay(rgb, cam.caption_map)), 'whole caption')]
        panels += [(_uint8(gradcam.overlay(rgb, word_map)), word) for word, word_map in zip(cam.words, cam.maps)]
        return itm, itc, panels

    def _look_model(self):
        if self.models.model is None or self.models.model_note:
            raise _error(self.models.model_note or 'no retrieval or pre-training checkpoint is loaded')
        return self.models.model

    # ---- Search ---------------------------------------------------------------------------------
    def build_index(self, progress=None):
        """The folder's embeddings: re-scans the folder (cheap) and embeds only new or changed files."""
        m = self._look_model()
        if self.models.folder is None:
            raise _error(self.models.folder_note or 'no image folder: start the demo with --images DIR')

        def report(done, total):
            if progress is not None:
                progress((done, total), desc='embedding the folder\'s images', unit='images')
        with self.lock:
            self.index = build_index(m, self.models.checkpoint, self.models.folder, self.models.extensions,
                                     progress=report)
            print(f'search index: {self.index.summary()}', flush=True)
            return self.index

    def search(self, text, k, rerank, candidates, progress=None):
        m = self._look_model()
        text = _caption(text, 'text')
        index = self.build_index(progress)
        if not index.names:
            raise _error(f'no readable images in {index.folder} ({index.summary()})')
        k = max(1, min(int(k), len(index.names)))
        try:
            itc = index.embeddings @ m.embed_texts([text])[0]
            if rerank:
                shortlist = itc.topk(max(k, min(int(candidates), len(index.names)))).indices.tolist()
                itm = m.itm([index.path(i) for i in shortlist], [text] * len(shortlist)).tolist()
                ranked = sorted(zip(shortlist, itm), key=lambda pair: -pair[1])[:k]
            else:
                ranked = [(i, None) for i in itc.topk(k).indices.tolist()]
        except (TaskError, ValueError, OSError) as error:  # a task mismatch, a text or image it cannot use
            raise _error(str(error)) from None
        gallery, rows = [], []
        for rank, (i, itm_score) in enumerate(ranked, 1):
            score = f'ITC {float(itc[i]):.3f}' if itm_score is None else f'ITM {itm_score:.3f}'
            gallery.append((index.path(i), f'#{rank} {score}'))  # the file names and all scores: the table
            rows.append([rank, index.names[i], round(float(itc[i]), 6),
                         None if itm_score is None else round(itm_score, 6)])
        return gallery, rows, index.summary()

    # ---- Ask ------------------------------------------------------------------------------------
    def ask(self, image, question, k):
        if self.models.vqa is None or self.models.vqa_note:
            raise _error(self.models.vqa_note or 'answering questions needs a VQA checkpoint (vqa.pth): '
                                                 'pass one with --vqa_checkpoint')
        image, question = _rgb(image), _caption(question, 'question')
        try:
            answers = self.models.vqa.answer(image, question, k=int(k))[0]
        except (TaskError, ValueError, OSError) as error:  # a task mismatch, a text or image it cannot use
            raise _error(str(error)) from None
        return {answer: float(p) for answer, p in answers}


LOOK_TEXT = """**Look**: how well does a caption match an image, and where does the model look for each word?
*ITM* is the probability that the image-text matching head (the fusion encoder's [CLS] through a
2-way classifier) gives to "match". *ITC* is the cosine similarity of the image and text embeddings
(the contrastive space that Search ranks in; the model's training divides it by a temperature).
The panels are per-word Grad-CAM: the cross-attention of one fusion layer from each word piece to
the image patches, weighted by the positive part of its gradient of the ITM "match" logit. The
*whole caption* panel is the mean of those word maps (before each is scaled for display)."""

SEARCH_TEXT = """**Search**: the images of the folder ranked by ITC similarity to your text. With *re-rank by
ITM*, the best ITC candidates are scored again with the image-text matching head and ordered by
its probability, as ALBEF's retrieval evaluation does. The folder's image embeddings are computed
at the first search and cached next to the images (`.albef_embeddings/`, one file per checkpoint;
new or changed images are embedded again)."""

ASK_TEXT = """**Ask**: the answers of a VQA checkpoint. The answer decoder scores every candidate of the
checkpoint's answer list by its first word piece, keeps the best, scores those whole answers and
gives their probabilities among the k kept."""


def block_choices(loaded):
    """The fusion layers that Grad-CAM can read, and the default: 8 of 6-10 for ALBEF. The last fusion
    layer is left out: there only the [CLS] row reaches the ITM head, so every word's map is zero."""
    if loaded is None:
        return [8], 8
    return gradcam.word_blocks(loaded.model), gradcam.word_block(loaded.model)


def image_and_text(tab, text_label, placeholder):
    """A tab's image upload and text box (elem_ids '<tab>-image' and '<tab>-<text_label>')."""
    image = image_input(type='pil', label='image', sources=['upload', 'clipboard'], height=260,
                        elem_id=f'{tab}-image')
    text = gr.Textbox(label=text_label, placeholder=placeholder, elem_id=f'{tab}-{text_label}')
    return image, text


def run_on(fn, button, text, inputs, outputs, api_name):
    """Run `fn` on a click of `button` (the API endpoint `api_name`) and on Enter in `text`, one
    request at a time across the tabs (they share the model)."""
    button.click(fn, inputs, outputs, api_name=api_name, concurrency_id='model', concurrency_limit=1)
    text.submit(fn, inputs, outputs, api_name=False, concurrency_id='model', concurrency_limit=1)


def build_app(models):
    """The gr.Blocks app serving `models` (a DemoModels)."""
    handlers = Handlers(models)
    look_model = models.model if models.model is not None and not models.model_note else None
    with gr.Blocks(title='ALBEF demo', analytics_enabled=False) as app:
        gr.Markdown(f'# ALBEF: see what it sees, search your photos, ask it questions\n{_loaded_line(models)}')
        with gr.Tab('Look', id='look'):
            gr.Markdown(LOOK_TEXT + (f'\n\n> {models.model_note}' if models.model_note else ''))
            with gr.Row():
                with gr.Column(scale=1):
                    look_image, look_caption = image_and_text('look', 'caption', 'e.g. a red circle on the left')
                    layers, default = block_choices(look_model)
                    look_block = gr.Dropdown(layers, value=default, label='Grad-CAM block (a fusion layer)',
                                             elem_id='look-block')
                    look_button = gr.Button('Look', variant='primary', elem_id='look-run')
                    if models.examples:  # [image, caption] pairs, or images alone
                        gr.Examples(models.examples, [look_image, look_caption][:len(models.examples[0])],
                                    label='examples')
                with gr.Column(scale=2):
                    with gr.Row():
                        look_itm = gr.Number(label='ITM match probability', elem_id='look-itm', interactive=False)
                        look_itc = gr.Number(label='ITC similarity', elem_id='look-itc', interactive=False)
                    look_panels = gr.Gallery(label='Grad-CAM: whole caption, then per word', columns=5, object_fit='contain',
                                             elem_id='look-panels')
            run_on(handlers.look, look_button, look_caption, [look_image, look_caption, look_block],
                   [look_itm, look_itc, look_panels], 'look')

        with gr.Tab('Search', id='search'):
            gr.Markdown(SEARCH_TEXT + ''.join(f'\n\n> {note}' for note in (models.model_note, models.folder_note)
                                              if note))
            with gr.Row():
                search_text = gr.Textbox(label='text', placeholder='e.g. a large blue square', scale=3,
                                         elem_id='search-text')
                search_k = gr.Slider(1, 24, value=8, step=1, label='top k', scale=1)
            with gr.Row():
                search_rerank = gr.Checkbox(label='re-rank by ITM', value=False)
                search_candidates = gr.Slider(1, 128, value=16, step=1, label='ITC candidates that ITM re-ranks')
                search_button = gr.Button('Search', variant='primary', elem_id='search-run')
            search_status = gr.Markdown(elem_id='search-status')
            search_gallery = gr.Gallery(label='best matches', columns=6, object_fit='contain',
                                        elem_id='search-gallery')
            search_table = gr.Dataframe(headers=['rank', 'image', 'ITC', 'ITM'], label='scores', interactive=False,
                                        elem_id='search-table')

            def search(text, k, rerank, candidates, progress=gr.Progress()):
                return handlers.search(text, k, rerank, candidates, progress)
            run_on(search, search_button, search_text, [search_text, search_k, search_rerank, search_candidates],
                   [search_gallery, search_table, search_status], 'search')

        with gr.Tab('Ask', id='ask'):
            gr.Markdown(ASK_TEXT + (f'\n\n> {models.vqa_note}' if models.vqa_note else ''))
            with gr.Row():
                with gr.Column(scale=1):
                    ask_image, ask_question = image_and_text('ask', 'question', 'e.g. what color is the circle?')
                    ask_k = gr.Slider(1, 10, value=5, step=1, label='answers (k)')
                    ask_button = gr.Button('Ask', variant='primary', elem_id='ask-run',
                                           interactive=models.vqa is not None and not models.vqa_note)
                    if models.vqa_examples:
                        gr.Examples(models.vqa_examples, [ask_image, ask_question], label='examples')
                with gr.Column(scale=1):
                    ask_answers = gr.Label(num_top_classes=10, label='answers', elem_id='ask-answers')
            run_on(handlers.ask, ask_button, ask_question, [ask_image, ask_question, ask_k], ask_answers, 'ask')
        from .classify import classify_tab
        classify_tab(models)
    app.handlers = handlers
    return app


def _loaded_line(models):
    parts = []
    if models.model is not None:
        parts.append(f'Look and Search: `{models.checkpoint}` ({models.model.task})')
    if models.vqa is not None:
        parts.append(f'Ask: `{models.vqa_checkpoint}` ({models.vqa.task})')
    if models.folder:
        parts.append(f'image folder: `{models.folder}`')
    return ' · '.join(parts)
