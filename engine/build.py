"""What a script builds on its Run: the tokenizer, the text encoder's initial weights, and
`prepare(run, model)`: the model on its device with its optimizer and schedule, started from
--checkpoint or resumed (--resume: engine/checkpointing.py), and wrapped for training
(DistributedDataParallel, gradient checkpointing, regional torch.compile)."""
import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

import utils
from configuration import ConfigError, one_line
from models.checkpoint import load_checkpoint
from models.fetch import resolve_checkpoint  # a released name: its download
from models.freeze import freeze_towers, parameter_counts
from models.tokenization_bert import BertTokenizer
from optim import create_optimizer
from scheduler import create_scheduler
from .checkpointing import Checkpointer, TrainState, resume


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
    """'longest' (the least padding), or under --compile (layers or step) 'max_length', so the BERT
    layers see one text shape every step (pass truncation=True and the task's max_length with it)."""
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
    optimizer_step: object = None  # make_optimizer_step(optimizer, run); None: built by the loop


def prepare(run, model, find_unused_parameters=False, **load_kwargs):
    """The model on the run's device with its optimizer and schedule; --resume continues from the
    newest checkpoint in output_dir, else --checkpoint (if any) is loaded into the model
    (`load_kwargs` go to models.checkpoint.load_checkpoint; new heads are allowed unless the run
    only evaluates)."""
    model = model.to(run.device)
    freeze(model, run.config)
    optimizer, lr_scheduler = build_optimization(run.config, model)
    checkpointer = Checkpointer(run.output_dir, model, optimizer, lr_scheduler, run.config, scaler=run.scaler,
                                rank=run.rank, world_size=run.world_size, before_write=run.start_output)
    state = TrainState()
    if run.args.resume:
        state = resume(run, checkpointer, model)
    elif run.args.checkpoint:
        trust = bool(getattr(run.args, 'trust_checkpoint', None) or run.config.get('trust_checkpoint'))
        load_kwargs.setdefault('allow_new_heads', not run.evaluating)
        load_checkpoint(model, resolve_checkpoint(run.args.checkpoint), trust=trust, **load_kwargs)
    wrapped, module = wrap_model(model, run, find_unused_parameters)
    optimizer_step = make_optimizer_step(optimizer, run)
    return Training(wrapped, module, optimizer, lr_scheduler, checkpointer, state, optimizer_step)


def freeze(model, config):
    """Freeze what the config's freeze_vision / freeze_text name (models/freeze.py) and print one
    line with the number of trained parameters."""
    try:
        frozen = freeze_towers(model, config.get('freeze_vision', False), config.get('freeze_text', False))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    trained, total = parameter_counts(model)
    utils.print0(f'trained parameters: {trained:,} of {total:,}' + (f' ({frozen} frozen)' if frozen else ''),
                 flush=True)


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
    if run.config.get('compile') == 'step':
        wrapped = CompileFallback(compile_model(wrapped, model, **step_compile_options(run.device)), wrapped)
    elif run.config.get('compile'):
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


def step_compile_options(device):
    """torch.compile's options under --compile step: CUDA graphs (mode 'reduce-overhead') on CUDA;
    on any other device the default mode, and a line saying CUDA graphs are not used."""
    if device.type == 'cuda':
        return {'mode': 'reduce-overhead'}
    utils.print0(f'compile step: CUDA graphs (reduce-overhead) are not used on {device.type}', flush=True)
    return {}


def compile_model(wrapped, model, **compile_kwargs):
    """Whole-model compilation (--compile step): torch.compile(wrapped), the model as the step calls
    it (DistributedDataParallel included, whose buckets then split the graphs), returned as a new
    callable: `model` and its state_dict keys are unchanged. Its backward is compiled with it
    (AOTAutograd's joint graph of each forward graph). For one shape every step, token packing is
    turned off and the masked-token index of pre-training gets a fixed length (mlm_positions
    'bound'); the host work (the MLM masks on the CPU generator, the index) stays out of the graphs.
    """
    for module in model.modules():
        if hasattr(module, 'pack_tokens'):
            module.pack_tokens = False
    if hasattr(model, 'mlm_positions'):
        model.mlm_positions = 'bound'
    return torch.compile(wrapped, **compile_kwargs)


def make_optimizer_step(optimizer, run, **compile_kwargs):
    """The optimizer step of one accumulated batch: clip the gradients to grad_clip_norm (if set),
    step, update the loss scale. Eager by default (through run.scaler). Under --compile step the
    clipping and the optimizer step are compiled together, with every group's lr a 0-d tensor (the
    schedule fills it in place: no recompilation as it changes). On CUDA AdamW then runs as
    foreach with capturable=True (the form torch's compiler fuses into one graph and CUDA graphs
    can capture); elsewhere the fused kernel stays, traced once per parameter group (torch allows
    a tensor lr with foreach only when capturable, and capturable only on accelerators).
    `compile_kwargs` default to step_compile_options(run.device)."""
    clip_norm = run.config.get('grad_clip_norm')  # None: off, as the original
    trained = [p for group in optimizer.param_groups for p in group['params']]
    scaler = run.scaler

    def eager_step():
        if clip_norm:  # the total norm over the trained parameters, of the true (unscaled) gradients
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trained, clip_norm)
        scaler.step(optimizer)
        scaler.update()

    compiled = run.config.get('compile') == 'step'
    device = trained[0].device if trained else torch.device('cpu')
    for group in optimizer.param_groups:  # (a resumed checkpoint may hold either kind)
        lr = float(group['lr'])
        group['lr'] = torch.tensor(lr, dtype=torch.float32, device=device) if compiled else lr
        if compiled and device.type == 'cuda':  # what the compiler fuses into one graph (CUDA graphs too)
            group.update(fused=False, foreach=True, capturable=True)
            for p in group['params']:  # capturable keeps the step count on the device
                if 'step' in optimizer.state.get(p, {}):
                    optimizer.state[p]['step'] = optimizer.state[p]['step'].to(device, torch.float32)
    if not compiled:
        return eager_step

    def step():  # (no GradScaler: options.speed_options refuses fp16 under --compile step)
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(trained, clip_norm)
        optimizer.step()

    options = compile_kwargs or step_compile_options(run.device)
    return CompileFallback(torch.compile(step, **options), step)


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
    `regions` are the modules compiled in place (module.compile()). Falling back sets torch's
    public compiler stance to 'force_eager' for the process (every compiled function then runs
    eagerly): torch has no public way to undo module.compile() on one module.
    """

    def __init__(self, compiled, eager, regions=()):
        self.compiled, self.eager, self.regions, self.failed = compiled, eager, list(regions), False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except compiler_errors() as error:
                self.failed = True
                if self.regions:  # compiled in place: only the stance turns them off
                    torch.compiler.set_stance('force_eager')
                utils.print0(f'torch.compile failed ({type(error).__name__}: {one_line(error)}); '
                             f'continuing in eager mode', flush=True)
        return self.eager(*args, **kwargs)

    def __getattr__(self, name):  # train(), eval(), no_sync(), module, ...
        return getattr(self.eager, name)
