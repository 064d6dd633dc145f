"""What a loaded checkpoint can do: `LoadedModel`, the object `models.load` (models/api.py) returns.

Its methods serve the tasks whose heads the checkpoint has (`NEEDS`, read off tasks.py): ITC
embeddings and similarity, ITM match probabilities and logits, per-word Grad-CAM, zero-shot
classification (models/zeroshot.py), VQA answers and SNLI-VE entailment. Images are PIL images,
paths or uint8 arrays, resized to `image_res` by the evaluation transform; texts are cleaned as in
training (`pre_caption` to `CAPTION_WORDS` words, `pre_question`). Images are opened under Pillow's
own decompression-bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`), which nothing here changes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import tasks
import utils
from dataset import build_transform
from dataset.utils import CAPTION_WORDS, pre_caption, pre_question
from . import gradcam
from .retrieval_eval import image_features, itm_logits, text_features

MAX_QUESTION_WORDS = 50  # pre_question's limit at VQA test time

# method -> (the tasks whose checkpoints serve it, from tasks.py; what it needs)
NEEDS = {
    'embed': (tasks.serving('embed'), 'image and text embeddings (ITC) need a pre-training or retrieval '
                                      'checkpoint (ALBEF.pth, mscoco.pth, flickr30k.pth)'),
    'itm': (tasks.serving('itm'), 'image-text matching (ITM) needs a pre-training, retrieval or grounding '
                                  'checkpoint (ALBEF.pth, mscoco.pth, flickr30k.pth, refcoco.pth)'),
    'gradcam': (tasks.serving('gradcam'), 'Grad-CAM maps need the ITM head of a pre-training, retrieval or '
                                          'grounding checkpoint (ALBEF.pth, mscoco.pth, refcoco.pth)'),
    'answer': (tasks.serving('answer'), 'answering questions needs a VQA checkpoint (vqa.pth)'),
    've': (tasks.serving('ve'), 'visual entailment needs an SNLI-VE checkpoint'),
}
VE_LABELS = ('contradiction', 'neutral', 'entailment')  # the class order of the VE head


class TaskError(ValueError):
    """A method that needs a head the loaded checkpoint's task does not have."""


@dataclass
class GradCam:
    """Per-word Grad-CAM of the ITM head: `maps[i]` (H, W) in [0, 1] at the image's own size is
    where word piece `words[i]` looks; `itm` is the pair's ITM match probability; `caption_map`
    the whole caption's (the mean over its word pieces, models/gradcam.caption_map), scaled alike."""
    words: list
    maps: np.ndarray
    itm: float
    caption_map: np.ndarray = None


def _as_list(items):
    """A list of items, or a (B, 3, H, W) batch of already transformed images as it is."""
    if torch.is_tensor(items):
        return items if items.dim() == 4 else items.unsqueeze(0)
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _repeat(items, n):
    return items.expand(n, *items.shape[1:]) if torch.is_tensor(items) else items * n


def to_pil(image):
    """A PIL RGB image from a PIL image, a path or an (H, W[, 3]) uint8 array (what Gradio passes)."""
    if isinstance(image, Image.Image):
        return image.convert('RGB')
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert('RGB')
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f'image not found: {image}')
        with Image.open(image) as f:
            return f.convert('RGB')
    raise TypeError(f'expected a PIL image, a path or a uint8 array, got {type(image).__name__}')


class LoadedModel:
    """An ALBEF model with its image transform and tokenizer; see `load`.

    Attributes: model (eval mode), task, config (the model config), tokenizer, transform (PIL ->
    normalised tensor at config['image_res'], the evaluation transform), device.
    """

    def __init__(self, model, task, config, tokenizer, device, answer_list=None):
        self.model, self.task, self.config, self.tokenizer, self.device = model, task, config, tokenizer, device
        self.transform = build_transform('test', config['image_res'])
        self.answer_list = answer_list
        self._answer_input = None

    def __repr__(self):
        return (f"LoadedModel(task={self.task!r}, image_res={self.config['image_res']}, "
                f"embed_dim={self.config.get('embed_dim')}, device='{self.device}')")

    def _need(self, what):
        tasks, message = NEEDS[what]
        if self.task not in tasks:
            raise TaskError(f'this is a {self.task!r} checkpoint; {message}')

    # ---- batching --------------------------------------------------------------------------
    @staticmethod
    def _batches(n, batch_size, progress, desc):
        return utils.progress(range(0, n, batch_size), desc=desc, disable=not progress, leave=False)

    def _images(self, images):
        """(B, 3, H, W) on the device, from PIL images and paths (or a transformed batch)."""
        if torch.is_tensor(images):
            return images.to(self.device)
        return torch.stack([self.transform(to_pil(i)) for i in images]).to(self.device)

    def _texts(self, texts):
        return [pre_caption(t, CAPTION_WORDS) for t in texts]

    # ---- ITC -------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_images(self, images, batch_size=64, progress=False):
        """(N, embed_dim) float32 on the CPU: L2-normalised image features of the ITC space."""
        self._need('embed')
        images = _as_list(images)
        out = [image_features(self.model, self._images(images[s:s + batch_size]))[1].float().cpu()
               for s in self._batches(len(images), batch_size, progress, 'images')]
        return torch.cat(out) if out else torch.zeros(0, self.config['embed_dim'])

    @torch.no_grad()
    def embed_texts(self, texts, batch_size=256, progress=False):
        """(N, embed_dim) float32 on the CPU: L2-normalised text features of the ITC space."""
        self._need('embed')
        texts = self._texts(_as_list(texts))
        out = [text_features(self.model, texts[s:s + batch_size], self.tokenizer, self.device,
                             max_length=CAPTION_WORDS)[1].float().cpu()
               for s in self._batches(len(texts), batch_size, progress, 'texts')]
        return torch.cat(out) if out else torch.zeros(0, self.config['embed_dim'])

    def similarity(self, images, texts):
        """(len(images), len(texts)): ITC cosine similarity of every image with every text."""
        return self.embed_images(images) @ self.embed_texts(texts).T

    # ---- ITM -------------------------------------------------------------------------------
    @torch.no_grad()
    def itm(self, images, texts, batch_size=64, progress=False):
        """(N,): the ITM match probability of each pair (images[i], texts[i]); one image (or one
        text) is paired with every text (every image)."""
        return F.softmax(self.itm_logits(images, texts, batch_size, progress), dim=1)[:, 1]

    @torch.no_grad()
    def itm_logits(self, images, texts, batch_size=64, progress=False):
        """(N, 2) float32 on the CPU: the ITM head's (no match, match) logits of each pair; the
        match logit is the retrieval evaluation's re-ranking score."""
        self._need('itm')
        images, texts = _as_list(images), _as_list(texts)
        if len(images) == 1 and len(texts) > 1:
            images = _repeat(images, len(texts))
        elif len(texts) == 1 and len(images) > 1:
            texts = texts * len(images)
        if len(images) != len(texts):
            raise ValueError(f'itm scores pairs: got {len(images)} images and {len(texts)} texts')
        texts = self._texts(texts)
        scores = []
        for s in self._batches(len(texts), batch_size, progress, 'pairs'):
            image_feats = image_features(self.model, self._images(images[s:s + batch_size]))[0]
            text_feats, _, text_atts = text_features(self.model, texts[s:s + batch_size], self.tokenizer,
                                                     self.device, max_length=CAPTION_WORDS)
            scores.append(itm_logits(self.model, image_feats, text_feats, text_atts).float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0, 2)

    # ---- Grad-CAM --------------------------------------------------------------------------
    def gradcam(self, image, text, block_num=8):
        """Per-word Grad-CAM of the ITM head at the cross-attention of text layer `block_num`.

        8 is ALBEF's (fusion layers 6-11). `block_num` is clipped to the fusion layers but the
        last: in the last layer only the [CLS] row reaches the ITM head, so every word's map
        would be zero there (the demo model, fused at 3-5, gets 4). None: the grounding default
        of models/gradcam.py. Returns a `GradCam` (per-word maps and the whole caption's)."""
        self._need('gradcam')
        picture = to_pil(image)
        block_num = gradcam.word_block(self.model, block_num)
        caption = self._texts([text])[0]
        tokens = self.tokenizer(caption, return_tensors='pt').to(self.device)  # [CLS] + word pieces
        token_maps, _ = gradcam.itm_gradcam(self.model, self._images([picture]), tokens, block_num)
        words = [self.tokenizer.decode([i]) for i in tokens.input_ids[0, 1:].tolist()]
        whole = gradcam.caption_map(token_maps, tokens, [self.tokenizer.sep_token_id])
        maps = gradcam.to_image_size(torch.cat([token_maps[0, 1:], whole]), *picture.size)
        return GradCam(words, maps[:-1], float(self.itm([picture], [text])[0]), maps[-1])

    def classify(self, images, class_names, templates=None, k=5, rerank=0, batch_size=64, progress=False):
        """Zero-shot classification by ITC over prompt templates, optionally re-ranked by ITM: one
        `zeroshot.Prediction` (top-k classes and scores) per image; see models/zeroshot.py."""
        from .zeroshot import classify  # zeroshot imports this module
        return classify(self, images, class_names, templates, k, rerank, batch_size, progress)

    # ---- VQA -------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, images, questions, k=5, batch_size=32, progress=False):
        """The k most probable answers of each question, [[(answer, probability), ...], ...], ranked
        among the candidate answers as VQA.py evaluates; one image is asked every question."""
        self._need('answer')
        if not self.answer_list:
            raise TaskError('answering questions needs the list of candidate answers: load with '
                            'answer_list= a JSON list of strings (the answer_list.json of VQA)')
        images, questions = _as_list(images), _as_list(questions)
        if len(images) == 1 and len(questions) > 1:
            images = _repeat(images, len(questions))
        if len(images) != len(questions):
            raise ValueError(f'answer asks one question per image: got {len(images)} images and '
                             f'{len(questions)} questions')
        if self._answer_input is None:
            self._answer_input = self.tokenizer([a + self.config.get('eos', '[SEP]') for a in self.answer_list],
                                                padding='longest', return_tensors='pt').to(self.device)
        k = max(1, min(k, len(self.answer_list)))
        results = []
        for s in self._batches(len(questions), batch_size, progress, 'questions'):
            question = self.tokenizer([pre_question(q, MAX_QUESTION_WORDS) for q in questions[s:s + batch_size]],
                                      padding='longest', return_tensors='pt').to(self.device)
            topk_ids, topk_probs = self.model(self._images(images[s:s + batch_size]), question, self._answer_input,
                                              train=False, k=k)
            results += [[(self.answer_list[i], float(p)) for i, p in zip(ids, probs)]
                        for ids, probs in zip(topk_ids.tolist(), topk_probs.tolist())]
        return results

    # ---- SNLI-VE ---------------------------------------------------------------------------
    @torch.no_grad()
    def entailment(self, images, texts, batch_size=64, progress=False):
        """(N, 3) probabilities of (contradiction, neutral, entailment) of each pair (images[i],
        texts[i]) (`VE_LABELS`); an SNLI-VE checkpoint only."""
        self._need('ve')
        images, texts = _as_list(images), _as_list(texts)
        if len(images) == 1 and len(texts) > 1:
            images = _repeat(images, len(texts))
        if len(images) != len(texts):
            raise ValueError(f'entailment scores pairs: got {len(images)} images and {len(texts)} texts')
        texts = self._texts(texts)
        out = []
        for s in self._batches(len(texts), batch_size, progress, 'pairs'):
            text = self.tokenizer(texts[s:s + batch_size], padding='longest', return_tensors='pt').to(self.device)
            logits = self.model(self._images(images[s:s + batch_size]), text, torch.zeros(len(text.input_ids)),
                                train=False)
            out.append(F.softmax(logits.float(), dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 3)
