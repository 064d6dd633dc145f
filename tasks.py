"""The tasks, one record each: the one place that lists them (docs/ARCHITECTURE.md, "Adding a task").

A `Task` names its script, its config keys (required and optional; every key's value check is
declared once, in `COMMON_KEYS`, `PRETRAIN_DATA_KEYS`, `TASK_KEYS`, `OPTIMIZER_KEYS` or
`SCHEDULER_KEYS`, beside the key), its datasets (`splits`), its model module, the heads that
identify its checkpoints, and the collate of its loaders. configuration.py checks configs against it,
dataset/ builds the datasets from it, models/api.py reads checkpoints with it, and the scripts
name their record (`TASK = tasks.RETRIEVAL`). Plain data, no torch: it is read before torch loads.

Adding a config key with its check is one line in one of the key tables, e.g.
    'grad_clip_norm': optional(number(0, low_open=True)),       # in COMMON_KEYS
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable


# ---- value checks -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """A value check: `test(value)` is True for an allowed value; `allowed` says what is allowed."""
    allowed: str
    test: Callable[[Any], bool]

    def __call__(self, value: Any) -> bool:
        return self.test(value)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def integer(low: int | None = None, high: int | None = None) -> Check:
    """An integer in [low, high] (either bound may be left open)."""
    if low == 1 and high is None:
        allowed = 'a positive integer'
    elif low == 0 and high is None:
        allowed = 'an integer >= 0'
    else:
        allowed = f'an integer from {low} to {high}'
    return Check(allowed, lambda v: _is_int(v) and (low is None or v >= low) and (high is None or v <= high))


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Check:
    """A finite number between low and high (bounds inclusive unless `*_open`)."""
    parts = ([f"{'>' if low_open else '>='} {low:g}"] if low is not None else []) + \
            ([f"{'<' if high_open else '<='} {high:g}"] if high is not None else [])
    allowed = 'a number' + (' ' + ' and '.join(parts) if parts else '')

    def test(v):
        return _is_number(v) and (low is None or (v > low if low_open else v >= low)) \
            and (high is None or (v < high if high_open else v <= high))
    return Check(allowed, test)


def one_of(*choices: Any, ignore_case: bool = False) -> Check:
    def norm(v):
        return v.lower() if ignore_case and isinstance(v, str) else v
    return Check('one of ' + ', '.join(str(c) for c in choices),
                 lambda v: isinstance(v, (str, bool)) and norm(v) in {norm(c) for c in choices})


def optional(check: Check) -> Check:
    """`check`, or null (the key's default)."""
    return Check(f'{check.allowed}, or null', lambda v: v is None or check(v))


POSITIVE = integer(1)
COUNT = integer(0)
BOOL = Check('true or false', lambda v: isinstance(v, bool))
TEXT = Check('a non-empty string', lambda v: isinstance(v, str) and bool(v.strip()))
FILES = Check('a file path or a non-empty list of file paths',
              lambda v: TEXT(v) or (isinstance(v, list) and bool(v) and all(TEXT(p) for p in v)))
SHARE = number(0, 1)
MAPPING = Check('a mapping of keys to values', lambda v: isinstance(v, dict))

# ---- the keys and their checks ------------------------------------------------------------------
# keys every task config may carry besides its own
COMMON_KEYS: dict[str, Check] = {
    'bert_config': TEXT,                      # a JSON file (checked to exist)
    'image_res': POSITIVE,                    # a multiple of patch_size
    'patch_size': POSITIVE,
    'vision_width': POSITIVE,                 # a multiple of vision_num_heads
    'vision_depth': POSITIVE,
    'vision_num_heads': POSITIVE,
    'text_encoder': TEXT,                     # a folder with a vocabulary, or a Hugging Face name
    'init_text_encoder': BOOL,
    'num_workers': COUNT,
    'print_freq': POSITIVE,
    'save_every_steps': optional(COUNT),
    'skip_bad_images': BOOL,
    'check_images': optional(BOOL),
    'max_image_pixels': optional(POSITIVE),   # null: no limit (dataset.base.DEFAULT_MAX_IMAGE_PIXELS)
    'augment': BOOL,
    'randaugment_autocontrast': one_of('original', 'pil'),
    'optimizer': MAPPING,                     # OPTIMIZER_KEYS
    'schedular': MAPPING,                     # SCHEDULER_KEYS
    'amp': Check('bf16, fp16 or off (null: the default)',
                 lambda v: v is None or v is False or v in ('bf16', 'fp16', 'off')),  # YAML `off` reads as false
    'eval_amp': BOOL,
    'accum_steps': POSITIVE,
    'grad_checkpointing': BOOL,
    'compile': Check('true (= layers), false, layers or step',
                     lambda v: v is None or isinstance(v, bool) or v in ('layers', 'step')),
    'log_to': optional(Check('a comma-separated string or a list of tensorboard, wandb or none',
                             lambda v: isinstance(v, str) or v is False
                             or (isinstance(v, list) and all(isinstance(n, str) for n in v)))),
    'trust_checkpoint': BOOL,
    'keep_checkpoints': optional(POSITIVE),
    'num_threads': optional(POSITIVE),
    # freeze a tower (models/freeze.py): true for all of it, N for its lowest N blocks / layers
    'freeze_vision': optional(Check('true, false or a number of blocks >= 0',
                                    lambda v: isinstance(v, bool) or (_is_int(v) and v >= 0))),
    'freeze_text': optional(Check('true, false or a number of layers >= 0',
                                  lambda v: isinstance(v, bool) or (_is_int(v) and v >= 0))),
    'grad_clip_norm': optional(number(0, low_open=True)),  # null: no clipping (the original)
}
# the pre-training data (Pretrain.py, Pretrain_nlvr.py): a JSON train_file, tar shards, or both
PRETRAIN_DATA_KEYS: dict[str, Check] = {
    'train_file': optional(FILES),          # null beside train_shards
    'train_shards': optional(FILES),
    'shuffle_buffer': COUNT,
    'samples_per_epoch': optional(POSITIVE),
    'jpeg_draft': BOOL,
}
# the keys of one or more tasks
TASK_KEYS: dict[str, Check] = {
    'train_file': FILES, 'val_file': FILES, 'test_file': FILES,
    'image_root': TEXT, 'vqa_root': TEXT, 'vg_root': TEXT, 'refcoco_data': TEXT,
    'answer_list': TEXT, 'det_file': TEXT, 'coco_file': TEXT, 'deit_checkpoint': TEXT,
    'batch_size': POSITIVE, 'batch_size_train': POSITIVE, 'batch_size_test': POSITIVE,
    'queue_size': POSITIVE,                   # a multiple of the global batch (x WORLD_SIZE)
    'embed_dim': POSITIVE, 'k_test': POSITIVE, 'topk_answers': POSITIVE, 'rerank_pairs_per_pass': POSITIVE,
    'block_num': COUNT,
    'temp': number(0, low_open=True),
    'momentum': SHARE, 'alpha': SHARE,
    'mlm_probability': number(0, 1, low_open=True, high_open=True),
    'distill': BOOL, 'warm_up': BOOL, 'itc_only': BOOL, 'init_deit': BOOL, 'eval_ema': BOOL,
    'nlvr_momentum_from_checkpoint': BOOL,
    'eos': TEXT,
    'vqa_normalization': one_of('official', 'always'),
}
OPTIMIZERS = ('adamW',)
OPTIMIZER_KEYS = {'opt': one_of(*OPTIMIZERS, ignore_case=True), 'lr': number(0, low_open=True),
                  'weight_decay': number(0)}
OPTIMIZER_OPTIONAL = {'fused': optional(BOOL)}
SCHEDULER_KEYS = {'sched': one_of('cosine'), 'lr': number(0, low_open=True), 'epochs': POSITIVE,
                  'min_lr': number(0), 'decay_rate': number(0), 'warmup_lr': number(0), 'warmup_epochs': COUNT,
                  'cooldown_epochs': COUNT}


# ---- the tasks ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """One dataset of a task: `cls` ('module.name' of its class) built from `config[file_key]`, the
    transform `transform`, the roots `config[k] for k in root_keys`, `kwargs` and the keyword
    arguments `{arg: config[key] for arg, key in config_kwargs}`."""
    name: str
    file_key: str
    cls: str
    transform: str
    root_keys: tuple = ()
    kwargs: tuple = ()          # (name, value) pairs
    config_kwargs: tuple = ()   # (argument, config key) pairs


@dataclass(frozen=True)
class Task:
    name: str
    script: str = ''
    required: tuple = ()        # key names (their checks: the key tables above)
    optional: tuple = ()
    splits: tuple = ()          # Split records, in the order create_dataset returns them
    model: str = ''             # the module of its model class ALBEF
    heads: tuple = ()           # (key prefix, rows of dim 0 or None): all present in its checkpoints
    serves: tuple = ()          # the models.load methods its checkpoints answer
    collate: str = ''           # the collate of its loaders: 'dataset.module.Class' (see dataset/collate.py)
    train_batch: str = 'batch_size'  # the key of the per-process training batch
    image_pairs: bool = False   # two images per text: each fusion layer split in two (models/model_nlvr.py)
    aliases: tuple = ()         # other names users type (create_dataset('re', ...), --task re)

    @property
    def keys(self) -> dict[str, Check]:
        """Every key of its config and its check: its own, the common ones."""
        own = {**TASK_KEYS, **PRETRAIN_DATA_KEYS}
        return {**{k: own.get(k) or COMMON_KEYS[k] for k in self.required + self.optional}, **COMMON_KEYS}


def _splits(module, train_cls, eval_cls, train_transform, names, roots, train_kwargs=(), test_kwargs=(),
            test_config=()):
    """The Split records of a fine-tuning task: 'train' with `dataset.<module>.<train_cls>`, the
    others with `eval_cls` and the test transform."""
    train_cls, eval_cls = f'dataset.{module}.{train_cls}', f'dataset.{module}.{eval_cls}'
    return tuple(Split('train', 'train_file', train_cls, train_transform, roots, train_kwargs) if name == 'train'
                 else Split(name, f'{name}_file', eval_cls, 'test', roots, test_kwargs, test_config)
                 for name in names)


_PRETRAIN = ('bert_config', 'image_res', 'batch_size', 'embed_dim')
_FINETUNE = ('bert_config', 'image_res', 'alpha', 'distill', 'warm_up')
_ITC = ('itm_head.weight', None)
PRETRAIN_SPLITS = (Split('train', 'train_file', 'dataset.caption_dataset.pretrain_dataset', 'pretrain'),)

PRETRAIN = Task(
    'pretrain', script='Pretrain.py', model='models.model_pretrain',
    required=_PRETRAIN + ('temp', 'mlm_probability', 'queue_size', 'momentum', 'alpha'),
    optional=('init_deit', 'deit_checkpoint', *PRETRAIN_DATA_KEYS),
    splits=PRETRAIN_SPLITS, collate='dataset.collate.MaskedCaptionCollate',
    heads=(_ITC, ('text_encoder.bert.', None)), serves=('embed', 'itm', 'gradcam'))
PRETRAIN_NLVR = Task(
    'pretrain_nlvr', script='Pretrain_nlvr.py', model='models.model_pretrain_nlvr',
    required=_PRETRAIN, optional=('temp', 'alpha', *PRETRAIN_DATA_KEYS),
    splits=PRETRAIN_SPLITS, collate='dataset.collate.CaptionCollate',
    heads=(('ta_head.weight', None),), image_pairs=True)
RETRIEVAL = Task(
    'retrieval', aliases=('re',), script='Retrieval.py', model='models.model_retrieval',
    required=_FINETUNE + ('train_file', 'val_file', 'test_file', 'image_root', 'batch_size_train', 'batch_size_test',
                          'queue_size', 'momentum', 'embed_dim', 'temp', 'k_test'),
    optional=('itc_only', 'rerank_pairs_per_pass'), train_batch='batch_size_train',
    splits=_splits('caption_dataset', 're_train_dataset', 're_eval_dataset', 'train', ('train', 'val', 'test'),
                   ('image_root',)),
    collate='dataset.collate.RetrievalCollate', heads=(_ITC,), serves=('embed', 'itm', 'gradcam'))
VQA = Task(
    'vqa', script='VQA.py', model='models.model_vqa',
    required=_FINETUNE + ('train_file', 'test_file', 'answer_list', 'vqa_root', 'vg_root', 'batch_size_train',
                          'batch_size_test', 'k_test', 'eos'),
    optional=('topk_answers', 'vqa_normalization'), train_batch='batch_size_train',
    splits=_splits('vqa_dataset', 'vqa_dataset', 'vqa_dataset', 'train', ('train', 'test'), ('vqa_root', 'vg_root'),
                   (('split', 'train'),), (('split', 'test'),), (('answer_list', 'answer_list'),)),
    collate='dataset.collate.VQACollate', heads=(('text_decoder.', None),), serves=('answer',))
VE = Task(
    've', script='VE.py', model='models.model_ve',
    required=_FINETUNE + ('train_file', 'val_file', 'test_file', 'image_root', 'batch_size_train', 'batch_size_test'),
    train_batch='batch_size_train',
    splits=_splits('ve_dataset', 've_dataset', 've_dataset', 'train', ('train', 'val', 'test'), ('image_root',)),
    collate='dataset.collate.VECollate', heads=(('cls_head.2.weight', 3),), serves=('ve',))
NLVR = Task(
    'nlvr', script='NLVR.py', model='models.model_nlvr',
    required=_FINETUNE + ('train_file', 'val_file', 'test_file', 'image_root', 'batch_size'),
    # eval_ema: a key of the original NLVR.yaml that nothing reads, accepted so that config loads
    optional=('eval_ema', 'nlvr_momentum_from_checkpoint'),
    splits=_splits('nlvr_dataset', 'nlvr_dataset', 'nlvr_dataset', 'train', ('train', 'val', 'test'), ('image_root',)),
    collate='dataset.collate.NLVRCollate', heads=(('cls_head.2.weight', 2),), image_pairs=True)
GROUNDING = Task(
    'grounding', script='Grounding.py', model='models.model_retrieval',
    required=_FINETUNE + ('train_file', 'test_file', 'refcoco_data', 'det_file', 'coco_file', 'image_root',
                          'batch_size', 'queue_size', 'momentum', 'vision_width', 'embed_dim', 'temp'),
    optional=('block_num',),
    splits=_splits('grounding_dataset', 'grounding_dataset', 'grounding_dataset', 'grounding_train',
                   ('train', 'test'), ('image_root',), (('mode', 'train'),), (('mode', 'test'),)),
    collate='dataset.collate.GroundingCollate')
# (grounding checkpoints have the retrieval heads: models.load reads them as retrieval ones)

TASKS = (PRETRAIN, PRETRAIN_NLVR, RETRIEVAL, VQA, VE, NLVR, GROUNDING)
# the order in which a checkpoint's heads are matched: a conversion keeps the keys it came from
# (a pre-training checkpoint converted for VQA still has itm_head), so the heads it adds come first
BY_HEADS = (VQA, PRETRAIN_NLVR, VE, NLVR, PRETRAIN, RETRIEVAL)


def get(name: str | Task) -> Task:
    """The task named `name` (or one of its aliases); ValueError naming the tasks otherwise."""
    if isinstance(name, Task):
        return name
    for task in TASKS:
        if name == task.name or name in task.aliases:
            return task
    raise ValueError(f'unknown task {name!r}; expected one of {", ".join(names())}')


def names(with_aliases: bool = False) -> list[str]:
    return [n for task in TASKS for n in (task.name, *(task.aliases if with_aliases else ()))]


def of_heads(state_dict) -> Task | None:
    """The task whose checkpoints have the heads of `state_dict` (a mapping of name -> tensor)."""
    for task in BY_HEADS:
        if all(_has_head(state_dict, prefix, rows) for prefix, rows in task.heads):
            return task
    return None


def _has_head(state_dict, prefix, rows):
    if rows is None:
        return any(k.startswith(prefix) for k in state_dict)
    return prefix in state_dict and state_dict[prefix].shape[0] == rows


def serving(what: str) -> tuple:
    """The names of the tasks whose checkpoints answer `models.load(...)` method `what`."""
    return tuple(task.name for task in TASKS if what in task.serves)
