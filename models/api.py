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
the `bert-base-uncased` tokenizer). What the loaded model does (its task methods, images and texts
as they take them) is models/loaded.py's `LoadedModel`.

A pre-training checkpoint is loaded into the retrieval model (without its MLM head, as zero-shot
retrieval does). Momentum encoders and feature queues only serve training and are not built.
"""
from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import dataclass

import torch

import tasks
from configuration import load_yaml
from .base import ContrastiveALBEF
from .checkpoint import (CheckpointError, is_pretrain_layout, load_checkpoint, read_checkpoint,
                         strip_for_release)
from .fetch import resolve_checkpoint
from .loaded import GradCam, LoadedModel, TaskError, VE_LABELS, to_pil  # noqa: F401 (load's results, as before)
from .tokenization_bert import BertTokenizer

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
            config = load_yaml(os.fspath(config))  # ConfigError (a ValueError) for a bad file
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
    try:
        return BertTokenizer.from_pretrained(source)
    except Exception as error:
        raise CheckpointError(f"cannot load the tokenizer {source!r} ({type(error).__name__}); pass text_encoder= "
                              f"(--text_encoder) a BERT name or a directory with its vocab.txt") from None


def build_model(task, config, tokenizer):
    """The task's model, for inference: no momentum encoders, no queues (they serve training only)."""
    config = {**config, 'distill': False}
    module = importlib.import_module('models.model_' + ('retrieval' if task == 'pretrain' else task))
    if task == 'vqa':
        return module.ALBEF(text_encoder=None, text_decoder=None, tokenizer=tokenizer, config=config)
    if issubclass(module.ALBEF, ContrastiveALBEF):  # its momentum encoders fill the queues in training
        return module.ALBEF(text_encoder=None, tokenizer=tokenizer, config=config, momentum=False)
    return module.ALBEF(text_encoder=None, tokenizer=tokenizer, config=config)


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


