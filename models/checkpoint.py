"""Reading original ALBEF checkpoints into any of the six variants
(docs/DESIGN.md, "Checkpoint layouts and conversions").

One entry point, `load_checkpoint(model, path)`:

1. read the file: a training checkpoint `{'model': state_dict, ...}` or a bare state_dict (the
   released fine-tuned files, without momentum encoders and queues), pickled (read with
   `torch.load(weights_only=True)`, see `read_checkpoint`) or in safetensors (a `models.export`
   directory or a `.safetensors` file);
2. convert a pre-training state_dict to the model's layout, exactly as the original scripts do:
   strip `bert.` (retrieval, grounding, VE), build the answer decoder from the fusion layers (VQA),
   or split every fusion layer into the two image sub-layers (NLVR2 text-assignment pre-training);
3. resize `visual_encoder.pos_embed` (and `visual_encoder_m.pos_embed` when present) to the
   model's image resolution;
4. load, and account for every key that does not match: differences that a conversion is known to
   leave (momentum encoders and queues absent from released files, heads the task adds, modules the
   task drops) are reported; anything else raises `CheckpointError` naming the keys.

Saving, keep-N and resuming a training run (the other side of these files) live in the engine,
`engine/checkpointing.py`; this module knows no run, process group or output directory.
"""
import argparse
import os
import pickle
import zipfile
from dataclasses import dataclass, field

import torch

import utils
from configuration import one_line
from .vit import interpolate_pos_embed

QUEUE_BUFFERS = ('image_queue', 'text_queue', 'idx_queue', 'queue_ptr')


class CheckpointError(ValueError):
    """The checkpoint does not fit the model (names the offending keys)."""


@dataclass
class LoadReport:
    """Keys that differed between checkpoint and model, all of them expected for the conversion."""
    source: str
    conversion: str
    missing_keys: list = field(default_factory=list)
    unexpected_keys: list = field(default_factory=list)
    momentum_from_online: bool = False

    def __str__(self):
        lines = [f'loaded {self.source} ({self.conversion})']
        if self.missing_keys:
            lines.append(f'  not in the checkpoint (expected): {summarise(self.missing_keys)}')
        if self.unexpected_keys:
            lines.append(f'  not used by this model (expected): {summarise(self.unexpected_keys)}')
        if self.momentum_from_online:
            lines.append('  momentum encoders initialised from the loaded online weights')
        return '\n'.join(lines)


def summarise(keys, limit=8):
    """Group keys by top-level module: 'text_encoder.cls.* (7 keys), itm_head.* (2 keys), temp'."""
    groups = {}
    for key in keys:
        parts = key.split('.')
        prefix = parts[0] + ('.cls' if parts[1:2] == ['cls'] else '') + ('.*' if len(parts) > 1 else '')
        groups[prefix] = groups.get(prefix, 0) + 1
    items = [f'{p} ({n} keys)' if n > 1 else p for p, n in groups.items()]
    return ', '.join(items[:limit]) + (f', ... ({len(items) - limit} more groups)' if len(items) > limit else '')


# ---- reading ------------------------------------------------------------------------------------
SAFETENSORS_FILE = 'model.safetensors'  # the weights of a `python -m models.export` directory

# Classes a released checkpoint may hold besides tensors and plain containers: harmless attribute
# bags (an argparse Namespace of the run's arguments). They are allowed into the restricted
# (weights_only) unpickler only while reading a file whose keys are those of a training checkpoint.
RELEASED_GLOBALS = {'argparse.Namespace': argparse.Namespace}
TRAINING_CHECKPOINT_KEYS = {'model', 'optimizer', 'lr_scheduler', 'config', 'epoch'}

_SIGNATURES = {b'\x89PNG': 'a PNG image', b'\xff\xd8\xff': 'a JPEG image', b'GIF8': 'a GIF image',
               b'%PDF': 'a PDF file', b'PK\x03\x04': 'a zip archive without a pickled object'}


def read_checkpoint(path, trust=False):
    """The object saved in a checkpoint file: a `torch.save` file or a safetensors file/directory.

    Pickled files are read with `torch.load(weights_only=True)` (tensors, numbers, strings and
    plain containers only: nothing in the file can run code). A file that needs more is loaded
    only when it is recognised as a released ALBEF training checkpoint whose only other objects
    are harmless ones (`RELEASED_GLOBALS`, still read by the restricted unpickler), or when
    `trust` is set (`--trust_checkpoint` / config key `trust_checkpoint`), which unpickles it fully.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, SAFETENSORS_FILE)):
            raise CheckpointError(f'{path}: a directory without {SAFETENSORS_FILE} (expected an export of '
                                  f'python -m models.export)')
        path = os.path.join(path, SAFETENSORS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f'{path} is not a readable safetensors file ({error})') from None
    _check_is_torch_file(path)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        if 'weights_only' not in str(error):
            raise CheckpointError(f'{path} is not a PyTorch checkpoint ({one_line(error)})') from None
        needs = _unsafe_globals(path)
    except Exception as error:  # a truncated zip, a torn write, ...
        raise CheckpointError(f'{path} is not a PyTorch checkpoint ({one_line(error)})') from None
    if trust:
        holds = ', '.join(needs) or 'Python objects'
        utils.print0(f'{path}: fully unpickled, as --trust_checkpoint asks (it holds {holds})')
        return torch.load(path, map_location='cpu', weights_only=False)
    released = _read_released(path, needs)
    if released is not None:
        return released
    raise CheckpointError(
        f'{path} holds Python objects besides tensors ({", ".join(needs) or "unknown"}), and unpickling them '
        f'can run code: pass --trust_checkpoint (config key trust_checkpoint: true) if you trust its source')


def _check_is_torch_file(path):
    """CheckpointError unless the file is a torch.save zip archive or a legacy pickle."""
    with open(path, 'rb') as f:
        head = f.read(8)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith('data.pkl') for name in archive.namelist()):
                return
    elif head[:1] == b'\x80':  # a pickle protocol header (torch's legacy format)
        return
    kind = next((what for magic, what in _SIGNATURES.items() if head.startswith(magic)), None)
    if kind is None:
        kind = 'empty' if not head else 'neither a torch.save archive nor a pickle'
    raise CheckpointError(f'{path} is not a PyTorch checkpoint ({kind})')


def _unsafe_globals(path):
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a legacy (non-zip) file
        return []


def _read_released(path, needs):
    """A released training checkpoint ({'model', 'optimizer', ..., 'config'}) whose only extra
    objects are in RELEASED_GLOBALS, read by the restricted unpickler; else None."""
    if not needs or not set(needs) <= set(RELEASED_GLOBALS):
        return None
    with torch.serialization.safe_globals([RELEASED_GLOBALS[name] for name in needs]):
        try:
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        except Exception:
            return None
    if not (isinstance(checkpoint, dict) and 'model' in checkpoint and set(checkpoint) <= TRAINING_CHECKPOINT_KEYS
            and isinstance(checkpoint['model'], dict) and 'visual_encoder.pos_embed' in checkpoint['model']):
        return None
    utils.print0(f'{path}: a released ALBEF checkpoint (recognised by its keys); its {", ".join(needs)} '
          f'read with the restricted unpickler')
    return checkpoint


def read_state_dict(checkpoint, trust=False):
    """A state_dict from a path (see `read_checkpoint`), a loaded checkpoint object, or a state_dict."""
    source = checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint, trust)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get('model'), dict):
        checkpoint = checkpoint['model']
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise CheckpointError(f'{source}: expected a state_dict or a {{"model": state_dict}} checkpoint')
    return dict(checkpoint)


# ---- conversions (pure functions on state_dicts) ------------------------------------------------
def is_pretrain_layout(state_dict):
    """True for a pre-training checkpoint (its text encoder is a BertForMaskedLM: `text_encoder.bert.`)."""
    return any(k.startswith('text_encoder.bert.') for k in state_dict)


def _with_layer(key, field_index, layer_num):
    parts = key.split('.')
    parts[field_index] = str(layer_num)
    return '.'.join(parts)


def strip_bert(state_dict):
    """Retrieval, grounding, VE: `text_encoder[_m].bert.X` -> `text_encoder[_m].X`."""
    return {k.replace('bert.', '') if 'bert' in k else k: v for k, v in state_dict.items()}


def pretrain_to_vqa(state_dict):
    """VQA (docs/DESIGN.md, "Checkpoint layouts and conversions"):
    the encoder gets every BERT layer without `bert.`; the decoder gets the
    embeddings, fusion layers 6-11 as decoder layers 0-5 and the MLM head."""
    out = dict(state_dict)
    fusion_layer = _fusion_layer(state_dict)
    for key, value in state_dict.items():
        if 'bert' in key:
            out[key.replace('bert.', '')] = value
        if 'text_encoder' in key:
            if 'layer' in key:
                layer_num = int(key.split('.')[4])
                if layer_num >= fusion_layer:
                    out[_with_layer(key, 4, layer_num - fusion_layer).replace('text_encoder', 'text_decoder')] = value
            else:
                out[key.replace('text_encoder', 'text_decoder')] = value
            del out[key]
    return out


def pretrain_to_ta(state_dict):
    """NLVR2 text-assignment (docs/DESIGN.md, "Checkpoint layouts and conversions"):
    strip `bert.`; fusion layer n goes to both image
    sub-layers 2(n-6)+6 and 2(n-6)+7 of the 18-layer encoder."""
    out = dict(state_dict)
    fusion_layer = _fusion_layer(state_dict)
    for key, value in state_dict.items():
        if 'bert' not in key:
            continue
        new_key = key.replace('bert.', '')
        layer_num = int(new_key.split('.')[3]) if 'layer' in new_key else -1
        if layer_num >= fusion_layer:
            sub_layer = 2 * (layer_num - fusion_layer) + fusion_layer
            out[_with_layer(new_key, 3, sub_layer)] = value
            out[_with_layer(new_key, 3, sub_layer + 1)] = value
        else:
            out[new_key] = value
        del out[key]
    return out


def _fusion_layer(state_dict):
    """The first layer with cross-attention in a pre-training state_dict (6 for ALBEF)."""
    layers = [int(k.split('.')[4]) for k in state_dict
              if k.startswith('text_encoder.bert.encoder.layer.') and '.crossattention.' in k]
    if not layers:
        raise CheckpointError('the pre-training state_dict has no cross-attention layers in text_encoder.bert')
    return min(layers)


CONVERSIONS = {'strip_bert': strip_bert, 'vqa': pretrain_to_vqa, 'ta': pretrain_to_ta}


def strip_for_release(state_dict):
    """The released fine-tuned format: no momentum encoders (`*_m`), no queues."""
    return {k: v for k, v in state_dict.items()
            if not k.split('.')[0].endswith('_m') and k not in QUEUE_BUFFERS}


# ---- loading ------------------------------------------------------------------------------------
def load_checkpoint(model, checkpoint, allow_new_heads=True, sync_momentum=True, trust=False, source=None):
    """Load an original or our own checkpoint into `model` (any ALBEF variant); returns a LoadReport.

    allow_new_heads: the task heads of `model.new_heads` may be absent (fine-tuning from a
        pre-training checkpoint); pass False when evaluating a fine-tuned checkpoint.
    sync_momentum: when the file has no momentum weights at all (released fine-tuned files), copy
        the loaded online weights into the momentum encoders. (NLVR's faithful mode passes False.)
    trust: fully unpickle a file that holds Python objects besides tensors (see `read_checkpoint`).
    source: the name of a state_dict passed as such, for the report and the errors.
    """
    source = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else source or 'state_dict'
    state_dict = read_state_dict(checkpoint, trust)

    conversion = getattr(model, 'checkpoint_conversion', None)
    if conversion and is_pretrain_layout(state_dict):
        state_dict = CONVERSIONS[conversion](state_dict)
        description = f'converted from pre-training: {conversion}'
    else:
        description = 'no conversion'

    own = model.state_dict()
    for key in ('visual_encoder.pos_embed', 'visual_encoder_m.pos_embed'):
        module = getattr(model, key.split('.')[0], None)
        if key in state_dict and module is not None:
            state_dict[key] = interpolate_pos_embed(state_dict[key], module)

    vocab_problem = word_embedding_problem(state_dict, own, source)
    if vocab_problem:
        raise CheckpointError(vocab_problem)
    wrong_shape = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
                   for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    bad_missing = [k for k in missing if not _may_be_missing(model, k, allow_new_heads)]
    bad_unexpected = [k for k in unexpected if not _is_foreign(model, k)]
    if wrong_shape or bad_missing or bad_unexpected:
        problems = []
        if wrong_shape:
            problems.append('wrong shape: ' + '; '.join(wrong_shape[:5]))
        if bad_missing:
            problems.append('missing: ' + ', '.join(bad_missing[:8]) + (' ...' if len(bad_missing) > 8 else ''))
        if bad_unexpected:
            problems.append('unexpected: ' + ', '.join(bad_unexpected[:8]) + (' ...' if len(bad_unexpected) > 8 else ''))
        raise CheckpointError(f'{source} does not fit {type(model).__module__}.{type(model).__name__} '
                              f'({description}): ' + ' | '.join(problems))

    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    momentum_keys = [k for k in own if k.split('.')[0].endswith('_m')]
    from_online = bool(momentum_keys) and sync_momentum and all(k in missing for k in momentum_keys)
    if from_online:
        model.copy_params()
    report = LoadReport(str(source), description, missing, unexpected, from_online)
    utils.print0(report)
    return report


def word_embedding_problem(state_dict, own, source):
    """A checkpoint whose word-embedding table has another number of rows than the model's
    (`vocab_size` of the bert_config, which the tokenizer's vocabulary must fit): both sizes."""
    for key, value in own.items():
        if key.endswith('embeddings.word_embeddings.weight') and key in state_dict \
                and state_dict[key].shape[0] != value.shape[0]:
            return (f'{source}: its word embeddings ({key}) have {state_dict[key].shape[0]} rows but the configured '
                    f'vocabulary has {value.shape[0]} (vocab_size of the bert_config): use the bert_config and '
                    f'text_encoder the checkpoint was trained with')
    return None


def _may_be_missing(model, key, allow_new_heads):
    top = key.split('.')[0]
    if top.endswith('_m') and top[:-2] in getattr(model, 'new_heads', ()):
        return allow_new_heads
    if top.endswith('_m') or top in QUEUE_BUFFERS:
        return True
    return allow_new_heads and top in getattr(model, 'new_heads', ())


def _is_foreign(model, key):
    """A checkpoint key for a module this model does not have (a head or projection of another task,
    an MLM head on a text encoder without one), as opposed to a mismatch inside a shared module."""
    parts = key.split('.')
    roots = {name for name, _ in model.named_children()}
    roots |= {name for name, _ in model.named_parameters(recurse=False)}
    roots |= {name for name, _ in model.named_buffers(recurse=False)}
    if parts[0] not in roots:
        return True
    encoder = getattr(model, parts[0])
    return parts[0].startswith('text_') and len(parts) > 1 and parts[1] == 'cls' and not hasattr(encoder, 'cls')
