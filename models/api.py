"""One call to load an ALBEF model for your own images and texts.

    import models
    m = models.load('mscoco.pth')                 # a .pth (ours or a released one) or an export directory
    images = m.embed_images(['a.jpg', 'b.jpg'])   # (2, 256) L2-normalised, the ITC space
    texts = m.embed_texts(['a dog', 'two cats'])  # (2, 256) L2-normalised
    images @ texts.T                              # = m.similarity(['a.jpg', 'b.jpg'], ['a dog', 'two cats'])
    m.itm(['a.jpg', 'a.jpg'], ['a dog', 'two cats'])  # ITM match probability of each pair
    cam = m.gradcam('a.jpg', 'a dog on the grass')     # per-word Grad-CAM maps at the image's size
    models.load('vqa.pth', answer_list='answer_list.json').answer('a.jpg', 'what is on the grass?')

`load` reads the task from the checkpoint's keys and the model sizes, `image_res` and tokenizer from
the checkpoint's stored config. Where the file has none (the released files), the sizes are read
off the weights (ViT width, depth, patch size and resolution from `visual_encoder.pos_embed` and
the patch projection; BERT widths, vocabulary and fusion layer from the text encoder) and the rest
are the released models' (ViT-B/16 and BERT-base heads of width 64, `configs/config_bert.json`,
the `bert-base-uncased` tokenizer). Images are PIL images, paths or uint8 arrays, resized to
`image_res` by the evaluation transform; texts are cleaned as in training (`pre_caption`,
`pre_question`).

A pre-training checkpoint is loaded into the retrieval model (without its MLM head, as zero-shot
retrieval does). Momentum encoders and feature queues only serve training and are not built.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import tasks
import utils
from .checkpoint import (CheckpointError, SAFETENSORS_FILE, is_pretrain_layout, load_checkpoint, read_checkpoint,
                         strip_for_release)
from .fetch import resolve_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED_BERT_CONFIG = os.path.join(ROOT, 'configs', 'config_bert.json')
RELEASED_TOKENIZER = 'bert-base-uncased'
CONFIG_FILE = 'config.json'
ANSWER_LIST_FILE = 'answer_list.json'

TASKS = tuple(task.name for task in tasks.TASKS if task.heads)  # the tasks a checkpoint can be read as
# the model-config keys an export keeps (besides `task` and `bert_config`)
MODEL_KEYS = ('image_res', 'patch_size', 'vision_width', 'vision_depth', 'vision_num_heads', 'embed_dim', 'temp',
              'mlm_probability', 'eos')
DEFAULTS = {'temp': 0.07, 'momentum': 0.995, 'mlm_probability': 0.15, 'alpha': 0.4, 'eos': '[SEP]'}
MAX_WORDS = 30        # pre_caption's limit everywhere in ALBEF
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


# ---- reading the checkpoint ---------------------------------------------------------------------
def infer_task(state_dict):
    """The task of a state_dict, from its heads (tasks.py): 'vqa', 'pretrain_nlvr', 've', 'nlvr',
    'pretrain' or 'retrieval' (also grounding); None when it is none of them."""
    task = tasks.of_heads(state_dict)
    return task.name if task else None


def _layers(state_dict, prefix):
    """Sorted layer numbers N of the keys `prefix.N.*`."""
    return sorted({int(k[len(prefix):].split('.')[0]) for k in state_dict if k.startswith(prefix)})


def _repo_path(path):
    """`path` as given, else relative to the repository (configs store paths relative to it)."""
    if not isinstance(path, str) or os.path.exists(path):
        return path
    inside = os.path.join(ROOT, path)
    return inside if os.path.exists(inside) else path


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f'{path}: cannot read the {what} ({error})') from None


def _stored_config(checkpoint):
    """The config a training checkpoint stores (a dict, or the original's argparse Namespace)."""
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint:
        return {}
    config = checkpoint.get('config')
    if config is not None and not isinstance(config, dict) and hasattr(config, '__dict__'):
        config = vars(config)
    return dict(config) if isinstance(config, dict) else {}


def model_config(state_dict, task, stored=None):
    """The model config of a state_dict: the stored config's sizes where it has them, else sizes
    read off the weights, else the released models' (see the module docstring)."""
    stored = dict(stored or {})
    config = dict(DEFAULTS)
    pos = state_dict.get('visual_encoder.pos_embed')
    proj = state_dict.get('visual_encoder.patch_embed.proj.weight')
    if pos is None or proj is None:
        raise CheckpointError('the checkpoint has no visual_encoder.pos_embed / patch_embed: not an ALBEF model')
    grid = math.isqrt(pos.shape[1] - 1)
    width = pos.shape[2]
    config.update(patch_size=proj.shape[-1], image_res=grid * proj.shape[-1], vision_width=width,
                  vision_depth=len(_layers(state_dict, 'visual_encoder.blocks.')), vision_num_heads=max(1, width // 64))
    if 'vision_proj.weight' in state_dict:
        config['embed_dim'] = state_dict['vision_proj.weight'].shape[0]
    config.update({k: stored[k] for k in MODEL_KEYS if k in stored})
    config['bert_config'] = bert_config(state_dict, task, stored.get('bert_config'))
    config['task'] = task
    return config


def bert_config(state_dict, task, stored=None):
    """The BERT config (a dict) of the text encoder: the stored one (a dict or a JSON path) or
    configs/config_bert.json, with every size the weights show taken from the weights."""
    if isinstance(stored, dict):
        config = dict(stored)
    elif isinstance(stored, str) and os.path.isfile(_repo_path(stored)):
        config = _read_json(_repo_path(stored), 'BERT config')
    else:
        config = _read_json(RELEASED_BERT_CONFIG, 'BERT config')
        config.pop('num_attention_heads', None)  # from the width below
    prefix = 'text_encoder.bert.' if is_pretrain_layout(state_dict) else 'text_encoder.'
    words = state_dict.get(prefix + 'embeddings.word_embeddings.weight')
    if words is None:
        raise CheckpointError(f'the checkpoint has no {prefix}embeddings.word_embeddings.weight: not an ALBEF model')
    layers = _layers(state_dict, prefix + 'encoder.layer.')
    fusion = [n for n in layers if f'{prefix}encoder.layer.{n}.crossattention.self.key.weight' in state_dict]
    config.update(vocab_size=words.shape[0], hidden_size=words.shape[1],
                  max_position_embeddings=state_dict[prefix + 'embeddings.position_embeddings.weight'].shape[0],
                  type_vocab_size=state_dict[prefix + 'embeddings.token_type_embeddings.weight'].shape[0],
                  intermediate_size=state_dict[f'{prefix}encoder.layer.0.intermediate.dense.weight'].shape[0])
    if fusion:
        config['fusion_layer'] = fusion[0]
        key = state_dict[f'{prefix}encoder.layer.{fusion[0]}.crossattention.self.key.weight']
        config['encoder_width'] = key.shape[1]
        # the image-pair models split every fusion layer in two (models/model_nlvr.py)
        pairs = tasks.get(task).image_pairs
        config['num_hidden_layers'] = fusion[0] + (len(layers) - fusion[0]) // (2 if pairs else 1)
    config.setdefault('num_attention_heads', max(1, config['hidden_size'] // 64))
    return config


@dataclass
class Resolved:
    """What a checkpoint holds, before any model is built."""
    source: str
    state_dict: dict
    task: str
    config: dict
    tokenizer_source: str
    answer_list: list = None


def resolve(checkpoint, task=None, text_encoder=None, answer_list=None, trust_checkpoint=False, config=None):
    """Read a checkpoint (a .pth or an export directory) into a `Resolved`; `config` (a dict or a
    task YAML) overrides the stored config's keys."""
    source = resolve_checkpoint(checkpoint)  # a released name (models/fetch.py): its download
    stored, tokenizer_source, answers = {}, None, None
    if os.path.isdir(source):
        config_path = os.path.join(source, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise CheckpointError(f'{source}: a directory without {CONFIG_FILE} (expected an export of '
                                  f'python -m models.export)')
        stored = _read_json(config_path, 'model config')
        state_dict = read_checkpoint(source)
        tokenizer_source = source
        if os.path.isfile(os.path.join(source, ANSWER_LIST_FILE)):
            answers = os.path.join(source, ANSWER_LIST_FILE)
    else:
        loaded = read_checkpoint(source, trust=trust_checkpoint)
        stored = _stored_config(loaded)
        state_dict = loaded['model'] if isinstance(loaded, dict) and isinstance(loaded.get('model'), dict) else loaded
        if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
            raise CheckpointError(f'{source}: expected a state_dict or a {{"model": state_dict}} checkpoint')
        if isinstance(stored.get('text_encoder'), str):
            tokenizer_source = _repo_path(stored['text_encoder'])
        if isinstance(stored.get('answer_list'), str) and os.path.isfile(_repo_path(stored['answer_list'])):
            answers = _repo_path(stored['answer_list'])
    if config is not None:
        if not isinstance(config, dict):
            from configuration import load_yaml  # ConfigError (a ValueError) for a bad file
            config = load_yaml(os.fspath(config))
        stored = {**stored, **config}
        if isinstance(config.get('text_encoder'), str):
            tokenizer_source = _repo_path(config['text_encoder'])
    found = infer_task(state_dict)
    if task is None:
        task = stored.get('task') if stored.get('task') in TASKS else found
        if task is None:
            raise CheckpointError(f'{source}: cannot tell the task from the keys (no itm_head, cls_head, ta_head or '
                                  f'text_decoder); pass task= one of {", ".join(TASKS)}')
    elif task not in TASKS:
        raise ValueError(f'task must be one of {", ".join(TASKS)}, got {task!r}')
    model_cfg = model_config(state_dict, task, stored)
    if answer_list is not None:
        answers = answer_list
    if isinstance(answers, (str, os.PathLike)):
        answers = _read_answer_list(os.fspath(answers))
    return Resolved(source, state_dict, task, model_cfg, text_encoder or tokenizer_source or RELEASED_TOKENIZER,
                    list(answers) if answers is not None else None)


def _read_answer_list(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'answer list not found: {path}')
    answers = _read_json(path, 'answer list')
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise CheckpointError(f'{path}: the answer list must be a JSON list of strings')
    return answers


def load_tokenizer(source):
    from .tokenization_bert import BertTokenizer
    try:
        return BertTokenizer.from_pretrained(source)
    except Exception as error:
        raise CheckpointError(f"cannot load the tokenizer {source!r} ({type(error).__name__}); pass text_encoder= "
                              f"(--text_encoder) a BERT name or a directory with its vocab.txt") from None


def build_model(task, config, tokenizer):
    """The task's model, for inference: no momentum encoders, no queues (they serve training only)."""
    import importlib
    config = {**config, 'distill': False, 'queue_size': 1}
    module = importlib.import_module('models.model_' + ('retrieval' if task == 'pretrain' else task))
    if task == 'vqa':
        model = module.ALBEF(text_encoder=None, text_decoder=None, tokenizer=tokenizer, config=config)
    else:
        model = module.ALBEF(text_encoder=None, tokenizer=tokenizer, config=config)
    for name, _ in list(model.named_children()):
        if name.endswith('_m'):
            delattr(model, name)
    for name in ('image_queue', 'text_queue', 'idx_queue', 'queue_ptr'):
        if hasattr(model, name):
            delattr(model, name)
    model.model_pairs = []
    return model


# ---- the loaded model ---------------------------------------------------------------------------
def load(checkpoint, task=None, device=None, *, text_encoder=None, answer_list=None, trust_checkpoint=False,
         config=None):
    """Load an ALBEF checkpoint for inference; returns a `LoadedModel` (model in eval mode).

    Args:
        checkpoint: a .pth file (ours, or a released one: ALBEF.pth, mscoco.pth, ...), a directory written
            by `python -m models.export`, or a released name ('ALBEF', 'mscoco', ...: models/fetch.py).
        task: 'pretrain', 'retrieval', 'vqa', 've', 'nlvr' or 'pretrain_nlvr'; by default read from
            the checkpoint's keys. (A pre-training checkpoint loads as any task whose heads it has.)
        device: default 'cuda' when available, else 'cpu'.
        text_encoder: the tokenizer (a BERT name or a directory with vocab.txt); default the one the
            checkpoint's config names, the export directory's, else bert-base-uncased.
        answer_list: VQA candidate answers (a list or a JSON file); default the export's
            answer_list.json or the file the checkpoint's config names.
        trust_checkpoint: fully unpickle a file that holds Python objects besides tensors.
        config: a task YAML or dict whose keys (model sizes, image_res, bert_config, text_encoder)
            override the checkpoint's stored config (for files that store none); a YAML that is
            missing or unusable raises configuration.ConfigError.
    """
    resolved = resolve(checkpoint, task, text_encoder, answer_list, trust_checkpoint, config)
    tokenizer = load_tokenizer(resolved.tokenizer_source)
    model = build_model(resolved.task, resolved.config, tokenizer)
    load_checkpoint(model, strip_for_release(resolved.state_dict), allow_new_heads=False, source=resolved.source)
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    return LoadedModel(model.to(device).eval(), resolved.task, resolved.config, tokenizer, device,
                       resolved.answer_list)


def _as_list(items):
    """A list of items, or a (B, 3, H, W) batch of already transformed images as it is."""
    if torch.is_tensor(items):
        return items if items.dim() == 4 else items.unsqueeze(0)
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _repeat(items, n):
    return items.expand(n, *items.shape[1:]) if torch.is_tensor(items) else items * n


def to_pil(image):
    """A PIL RGB image from a PIL image, a path or an (H, W[, 3]) uint8 array (what Gradio passes)."""
    from PIL import Image
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
        from dataset import build_transform
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
        from dataset.utils import pre_caption
        return [pre_caption(t, MAX_WORDS) for t in texts]

    # ---- ITC -------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_images(self, images, batch_size=64, progress=False):
        """(N, embed_dim) float32 on the CPU: L2-normalised image features of the ITC space."""
        from .retrieval_eval import image_features
        self._need('embed')
        images = _as_list(images)
        out = [image_features(self.model, self._images(images[s:s + batch_size]))[1].float().cpu()
               for s in self._batches(len(images), batch_size, progress, 'images')]
        return torch.cat(out) if out else torch.zeros(0, self.config['embed_dim'])

    @torch.no_grad()
    def embed_texts(self, texts, batch_size=256, progress=False):
        """(N, embed_dim) float32 on the CPU: L2-normalised text features of the ITC space."""
        from .retrieval_eval import text_features
        self._need('embed')
        texts = self._texts(_as_list(texts))
        out = [text_features(self.model, texts[s:s + batch_size], self.tokenizer, self.device,
                             max_length=MAX_WORDS)[1].float().cpu()
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
        from .retrieval_eval import image_features, itm_logits, text_features
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
                                                     self.device, max_length=MAX_WORDS)
            scores.append(itm_logits(self.model, image_feats, text_feats, text_atts).float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0, 2)

    # ---- Grad-CAM --------------------------------------------------------------------------
    def gradcam(self, image, text, block_num=8):
        """Per-word Grad-CAM of the ITM head at the cross-attention of text layer `block_num`.

        8 is ALBEF's (fusion layers 6-11). `block_num` is clipped to the fusion layers but the
        last: in the last layer only the [CLS] row reaches the ITM head, so every word's map
        would be zero there (the demo model, fused at 3-5, gets 4). None: the grounding default
        of models/gradcam.py. Returns a `GradCam` (per-word maps and the whole caption's)."""
        from . import gradcam
        self._need('gradcam')
        picture = to_pil(image)
        layers = gradcam.fusion_layers(self.model)
        if block_num is None:
            block_num = gradcam.default_block_num(self.model, 'itm')
        block_num = min(max(int(block_num), layers[0]), layers[-2] if len(layers) > 1 else layers[0])
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
        from .zeroshot import classify
        return classify(self, images, class_names, templates, k, rerank, batch_size, progress)

    # ---- VQA -------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, images, questions, k=5, batch_size=32, progress=False):
        """The k most probable answers of each question, [[(answer, probability), ...], ...], ranked
        among the candidate answers as VQA.py evaluates; one image is asked every question."""
        from dataset.utils import pre_question
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
