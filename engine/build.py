"""What a script builds on its Run: the tokenizer, the text encoder's initial weights, and
`prepare(run, model)`: the model on its device with its optimizer and schedule, started from
--checkpoint or resumed (--resume), and wrapped for training (DistributedDataParallel, gradient
checkpointing, regional torch.compile)."""
import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

import utils
from configuration import ConfigError, one_line
from models.checkpoint import Checkpointer, TrainState, load_checkpoint
from models.fetch import resolve_checkpoint  # a released name: its download
from models.freeze import FREEZE_KEYS, freeze_towers, parameter_counts
from models.tokenization_bert import BertTokenizer
from optim import create_optimizer
from scheduler import create_scheduler


def build_tokenizer(config):
    tokenizer = BertTokenizer.from_pretrained(config['text_encoder'])
    check_vocab_size(tokenizer, config)
    return tokenizer


def check_vocab_size(tokenizer, config):
    """The tokenizer's word pieces must all have a row in the word-embedding table (`vocab_size` of
    the bert_config); otherwise the first caption with a high token id fails deep in the model."""
    path = config.get('bert_config')
    try:
        with open(path) as f:
            vocab_size = json.load(f)['vocab_size']
    except (TypeError, OSError, ValueError, KeyError):
        return  # a missing or broken bert_config is reported where the model reads it
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer of {config['text_encoder']} has {len(tokenizer)} word pieces but {path} "
                          f"sets vocab_size: {vocab_size} (the rows of the word-embedding table): set "
                          f"vocab_size: {len(tokenizer)} in {path}, or point text_encoder at the vocabulary the "
                          f"config was made for")


def bert_weights(config):
    """Where the text encoder's pretrained weights come from (None: random initialisation)."""
    return config['text_encoder'] if config.get('init_text_encoder', True) else None


def text_padding(run):
    """'longest' (the least padding), or under --compile 'max_length', so the BERT layers see one
    text shape every step (pass truncation=True and the task's max_length with it)."""
    return 'max_length' if run.config.get('compile') else 'longest'


def build_optimization(config, model):
    """(AdamW with the original's parameter groups, the warm-up + cosine schedule)."""
    optimizer = create_optimizer(config['optimizer'], model)
    lr_scheduler, _ = create_scheduler(config['schedular'], optimizer)
    return optimizer, lr_scheduler


@dataclass
class Training:
    """What `fit` trains: `model` is what the step calls (DDP / compiled), `module` the bare model."""
    model: object
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    checkpointer: Checkpointer
    state: TrainState


def prepare(run, model, find_unused_parameters=False, **load_kwargs):
    """The model on the run's device with its optimizer and schedule; --resume continues from the
    newest checkpoint in output_dir, else --checkpoint (if any) is loaded into the model
    (`load_kwargs` go to models.checkpoint.load_checkpoint; new heads are allowed unless the run
    only evaluates)."""
    model = model.to(run.device)
    freeze(model, run.config)
    optimizer, lr_scheduler = build_optimization(run.config, model)
    checkpointer = Checkpointer(run.output_dir, model, optimizer, lr_scheduler, run.config, scaler=run.scaler,
                                rank=run.rank, world_size=run.world_size, before_write=run.write_config)
    state = TrainState()
    if run.args.resume:
        check_same_frozen(checkpointer, run.config)
        state = resume(run, checkpointer, model)
    elif run.args.checkpoint:
        trust = bool(getattr(run.args, 'trust_checkpoint', None) or run.config.get('trust_checkpoint'))
        load_kwargs.setdefault('allow_new_heads', not run.evaluating)
        load_checkpoint(model, resolve_checkpoint(run.args.checkpoint), trust=trust, **load_kwargs)
    wrapped, module = wrap_model(model, run, find_unused_parameters)
    return Training(wrapped, module, optimizer, lr_scheduler, checkpointer, state)


def freeze(model, config):
    """Freeze what the config's freeze_vision / freeze_text name (models/freeze.py) and print one
    line with the number of trained parameters."""
    try:
        frozen = freeze_towers(model, config.get('freeze_vision', False), config.get('freeze_text', False))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    trained, total = parameter_counts(model)
    utils.print0(f'trained parameters: {trained:,} of {total:,}' + (f' ({frozen} frozen)' if frozen else ''), flush=True)


def check_same_frozen(checkpointer, config):
    """--resume trains what the run it continues trained: its optimizer state holds exactly those
    parameters, so a different freeze_vision / freeze_text is an error, not a silent mismatch."""
    found = checkpointer.newest()
    if found is None:
        return  # resume() reports it
    then, now = _frozen_setting(found[1].get('config') or {}), _frozen_setting(config)
    if then != now:
        raise ConfigError(f'--resume: {found[0]} was trained with {then}, this run has {now}; resume with the same '
                          f'setting (its optimizer state holds only the parameters trained then)')


def _frozen_setting(config):
    """'freeze_vision: true, freeze_text: 2' (absent, null and 0 read as false; true is not 1)."""
    return ', '.join(f'{key}: {str(config.get(key) or False).lower()}' for key in FREEZE_KEYS)


# the config keys that set the model's shapes, named when a --resume checkpoint does not fit
SHAPE_KEYS = ('image_res', 'patch_size', 'vision_width', 'vision_depth', 'vision_num_heads', 'embed_dim',
              'queue_size', 'bert_config')


def resume(run, checkpointer, model):
    """checkpointer.resume(); a checkpoint whose weights do not fit the config's model ends in one
    line naming the checkpoint, the config and the first differing keys (not torch's list of every
    missing and unexpected tensor)."""
    try:
        return checkpointer.resume()
    except RuntimeError as error:
        if 'Error(s) in loading state_dict' not in str(error):
            raise
    path, ckpt = checkpointer.newest()
    own, theirs = model.state_dict(), ckpt['model']
    differing = [k for k in sorted(own.keys() ^ theirs.keys(), key=_natural)] + \
                [k for k in own if k in theirs and own[k].shape != theirs[k].shape]
    stored = ckpt.get('config') if isinstance(ckpt.get('config'), dict) else {}
    keys = [f'{k}: {stored[k]!r} in the checkpoint, {run.config.get(k)!r} in the config' for k in SHAPE_KEYS
            if k in stored and stored[k] != run.config.get(k)]
    found = '; '.join(keys) if keys else 'first differing tensors: ' + ', '.join(differing[:3])
    raise ConfigError(f'--resume: {path} holds another model than {run.args.config} describes ({found}); '
                      f'resume with the config of that run ({run.path("config.yaml")}), or start a new '
                      f'--output_dir') from None


def _natural(key):
    """Sort key: numbered layers in numeric order (blocks.3 before blocks.10)."""
    return [(0, int(part), '') if part.isdigit() else (1, 0, part) for part in key.split('.')]


def wrap_model(model, run, find_unused_parameters=False):
    """(model to call, the bare model): DistributedDataParallel only with several processes, with
    gradient checkpointing and regional torch.compile when asked for.

    DistributedDataParallel is set up for ALBEF:
    - device_ids=None: DDP does not move the inputs (its copies of a tokenizer dict block the host);
      every train_step moves its batch itself (utils.to_device), before calling the model.
    - broadcast_buffers=False: the only buffers that change, the feature queues and their pointer,
      are equal on every rank by construction (each rank enqueues the same all-gathered features),
      so they are broadcast once here instead of 128 MiB from rank 0 at every forward.
    - gradient_as_bucket_view=True: gradients live in DDP's all-reduce buckets (no copy, less memory).
    - static_graph=True when every step back-propagates through the same parameters in the same
      way, which holds for every ALBEF script; not with gradient accumulation (accum_steps > 1),
      where no_sync() leaves out the all-reduce on some backward passes.
    """
    model = model.to(run.device)
    if run.config.get('grad_checkpointing'):
        model.set_grad_checkpointing(True)
    wrapped = model
    if run.distributed:
        with torch.no_grad():  # DDP with broadcast_buffers=False does not even sync them at the start
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None, find_unused_parameters=find_unused_parameters, broadcast_buffers=False,
            gradient_as_bucket_view=True, static_graph=run.accum_steps == 1)
    if run.config.get('compile'):
        regions = compile_regions(model)
        wrapped = CompileFallback(wrapped, wrapped, regions)
    return wrapped, model


def compile_regions(model, **compile_kwargs):
    """Regional compilation: torch.compile every ViT block (`blocks`) and every BERT layer
    (`encoder.layer`) in place, online and momentum encoders alike, instead of the whole model.

    The blocks of one encoder share their code, so one compiled graph serves them all (after one
    compile per distinct layer kind: text, fusion, decoder); the losses, sampling and queues stay in
    eager mode, so nothing there (alpha, the number of masked tokens) triggers a recompilation. The
    modules keep their names: state_dict keys and checkpoints are unchanged. Token packing is
    turned off (`BertModel.pack_tokens`): the layers then see one shape, the padded one, and never
    recompile for the number of real tokens. Returns the modules.
    """
    regions = []
    for module in model.modules():
        if hasattr(module, 'pack_tokens'):
            module.pack_tokens = False
        for name in ('blocks', 'layer'):
            children = getattr(module, name, None)
            if isinstance(children, torch.nn.ModuleList):
                regions.extend(children)
    for region in regions:
        region.compile(**compile_kwargs)
    return regions


def compiler_errors():
    """The exception classes torch.compile raises when it cannot compile (dynamo tracing, the
    backend, inductor lowering, a missing or failing C++/CUDA compiler)."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc
    names = ('OperatorIssue', 'SubgraphLoweringException', 'InvalidCxxCompiler', 'CppWrapperCodegenError',
             'CppCompileError')
    return (dynamo_exc.TorchDynamoException,) + tuple(getattr(inductor_exc, n) for n in names
                                                      if hasattr(inductor_exc, n))


class CompileFallback:
    """Calls the model with its compiled regions, and in eager mode for good once compiling fails.

    Only the compiler's own errors (`compiler_errors()`) switch to eager mode, with a one-line note
    naming the error; every other exception (a bad batch, running out of memory, a bug) passes
    through unchanged. The step that failed to compile runs again in eager mode (where the error
    came after the momentum update, that step moves the momentum encoders twice: once per run).
    `regions` are the modules compiled in place (module.compile()); falling back un-compiles them.
    """

    def __init__(self, compiled, eager, regions=()):
        self.compiled, self.eager, self.regions, self.failed = compiled, eager, list(regions), False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except compiler_errors() as error:
                self.failed = True
                for module in self.regions:
                    module._compiled_call_impl = None  # back to the module's own forward
                utils.print0(f'torch.compile failed ({type(error).__name__}: {one_line(error)}); '
                      f'continuing in eager mode', flush=True)
        return self.eager(*args, **kwargs)

    def __getattr__(self, name):  # train(), eval(), no_sync(), module, ...
        return getattr(self.eager, name)
