"""The shared training scaffold: arguments, configs, process setup, data loading, the epoch loop
(`fit`), checkpoints with exact resume, and logging. Each task script builds its model, data and
evaluation, then hands them to `fit`.

A script is started in any of these ways, with the same code path:
    python Pretrain.py --config configs/Pretrain.yaml --output_dir out          (one process)
    torchrun --nproc_per_node=8 Pretrain.py ...                                 (also multi-node)
    python -m torch.distributed.launch --nproc_per_node=8 --use_env Pretrain.py ...
    srun python Pretrain.py ...                                                 (SLURM)
"""
import argparse
import contextlib
import errno
import json
import os
import random
import signal
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from ruamel.yaml import YAML

import configuration
import tracking
import utils
from configuration import ConfigError, check_keys, load_yaml  # noqa: F401 (also engine.ConfigError, ...)
from models.checkpoint import CheckpointError, load_checkpoint
from models.tokenization_bert import BertTokenizer
from optim import create_optimizer
from scheduler import create_scheduler

WARMUP_STEP_SIZE = 100  # the warm-up advances the scheduler every 100 iterations of epoch 0
MAX_WORKERS = 8  # the default num_workers: the CPUs of each process, at most this many

# keys every task config may carry besides its own
COMMON_KEYS = {
    'bert_config', 'image_res', 'vision_width', 'vision_depth', 'vision_num_heads', 'patch_size',
    'text_encoder', 'init_text_encoder', 'num_workers', 'print_freq', 'save_every_steps',
    'skip_bad_images', 'check_images', 'augment', 'randaugment_autocontrast', 'optimizer', 'schedular', 'amp',
    'accum_steps', 'grad_checkpointing', 'compile', 'log_to', 'trust_checkpoint', 'keep_checkpoints',
    'num_threads',
}
AMP_MODES = ('bf16', 'fp16', 'off')
OPTIMIZER_KEYS = {'opt', 'lr', 'weight_decay'}
SCHEDULER_KEYS = {'sched', 'lr', 'epochs', 'min_lr', 'decay_rate', 'warmup_lr', 'warmup_epochs',
                  'cooldown_epochs'}


class NonFiniteLossError(FloatingPointError):
    pass


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of space (the message names the last good one)."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training; `code` is the exit status (128 + the signal number)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


# ---- arguments and configuration ----------------------------------------------------------------
def get_args_parser(config, output_dir):
    """The flags every script shares; scripts add their own on top (argparse `parents=`)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--config', default=config, help='task YAML file')
    parser.add_argument('--output_dir', default=output_dir, help='where logs and checkpoints go')
    parser.add_argument('--checkpoint', default='', help='checkpoint to start from (original or ours)')
    parser.add_argument('--text_encoder', default=None,
                        help="BERT name or directory for the tokenizer and weights (default: the config's "
                             "text_encoder, else bert-base-uncased)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seed', default=42, type=int)
    parser.add_argument('--world_size', default=1, type=int, help='set by the launcher; kept for compatibility')
    parser.add_argument('--dist_url', default='env://')
    parser.add_argument('--distributed', default=True, action=argparse.BooleanOptionalAction,
                        help='join the process group when a launcher started several processes')
    parser.add_argument('--resume', action='store_true',
                        help='continue from the newest checkpoint in --output_dir')
    parser.add_argument('--trust_checkpoint', action='store_true', default=None,
                        help='fully unpickle a --checkpoint that holds Python objects besides tensors (only '
                             'for files from a source you trust; also the config key trust_checkpoint)')
    parser.add_argument('--overwrite', action='store_true',
                        help='start again in an --output_dir that holds checkpoints (they are replaced)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--log_to', default=None,
                        help="where rank 0 also sends the step and epoch scalars: a comma-separated list of "
                             "tensorboard (output_dir/tensorboard/) and wandb, or none (default: the config's "
                             "log_to, else tensorboard)")
    speed = parser.add_argument_group('speed and memory (each also a config key of the same name)')
    speed.add_argument('--amp', choices=AMP_MODES, default=None,
                       help='mixed precision for training (default: bf16 on GPUs that support it, else off)')
    speed.add_argument('--grad_checkpointing', default=None, action=argparse.BooleanOptionalAction,
                       help='recompute the online encoders\' activations in the backward pass (less memory)')
    speed.add_argument('--accum_steps', type=int, default=None,
                       help='micro-batches per optimizer step (gradient accumulation; default 1)')
    speed.add_argument('--compile', default=None, action=argparse.BooleanOptionalAction,
                       help='torch.compile each ViT block and BERT layer (regional compilation); falls '
                            'back to eager mode if the compiler fails')
    speed.add_argument('--eval_amp', action='store_true',
                       help='evaluate under the training --amp precision (default: float32)')
    speed.add_argument('--num_threads', type=int, default=None,
                       help='intra-op CPU threads of each process (default: the cores this process may use, '
                            'shared among the processes of the node, less one per loader worker)')
    return parser


def require_one_of(config, path, keys):
    """At least one of `keys` is set (e.g. train_file or train_shards)."""
    if not any(config.get(key) for key in keys):
        raise ConfigError(f"{path}: needs {' or '.join(repr(k) for k in keys)}")


def load_config(path, required, optional=()):
    """Read a task YAML and validate its keys against the task's schema."""
    config = load_yaml(path)
    check_keys(config, path, set(required) | {'optimizer', 'schedular'}, COMMON_KEYS | set(optional))
    check_keys(config['optimizer'], path, OPTIMIZER_KEYS, {'fused'}, 'optimizer.')
    check_keys(config['schedular'], path, SCHEDULER_KEYS, (), 'schedular.')
    return config


# ---- process setup ------------------------------------------------------------------------------
@dataclass
class Run:
    args: argparse.Namespace
    config: dict
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')
    output_dir: str = ''
    tokenizer: object = None
    amp: str = 'off'
    accum_steps: int = 1
    scaler: object = None
    writer: object = None  # tracking.ScalarWriter (TensorBoard / W&B), rank 0 only
    replaces: list = field(default_factory=list)  # --overwrite: the earlier run's files, removed at the first write
    _config_written: bool = False

    def autocast(self):
        """The training-step precision context (a no-op with amp 'off')."""
        dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(self.amp, torch.float32)
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp != 'off')

    @contextlib.contextmanager
    def eval_precision(self):
        """Evaluation precision: float32 (TF32 off) by default; with --eval_amp the training amp."""
        if getattr(self.args, 'eval_amp', False):
            with self.autocast():
                yield
            return
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def path(self, name):
        return os.path.join(self.output_dir, name)

    def write_config(self):
        """The effective config goes to output_dir/config.yaml with the first file the run writes,
        so a run that fails on bad input leaves an existing output_dir untouched."""
        if self._config_written or not self.is_main:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        for name in self.replaces:  # announced at start-up by check_output_dir
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path(name))
        name = 'config.yaml'
        if getattr(self.args, 'evaluate', False) and os.path.exists(self.path(name)):
            name = 'config_evaluate.yaml'  # beside the training run's, which stays as it was
        with open(self.path(name), 'w') as f:
            YAML(typ='safe').dump(self.config, f)
        self._config_written = True


def setup(args, config):
    """Join the process group if launched with several processes, pick the device, seed."""
    if str(args.device).startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError('--device cuda: CUDA is not available on this machine (use --device cpu)')
    utils.init_distributed_mode(args)
    device = torch.device(f'cuda:{args.gpu}' if str(args.device) == 'cuda' else args.device)
    seed = args.seed + args.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        # TF32 tensor cores for float32 matrix products in training (Ampere and newer; ignored
        # elsewhere); evaluation turns them off again unless --eval_amp (Run.eval_precision)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config.setdefault('text_encoder', 'bert-base-uncased')
    if args.text_encoder:
        config['text_encoder'] = args.text_encoder
    speed_options(args, config, device)
    for key in ('keep_checkpoints', 'num_threads'):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f'{args.config}: {key}: expected a positive integer, got {value!r}')
    backends = log_to_option(args, config)
    replaces = check_output_dir(args)
    set_threads(args, config, device)
    run = Run(args=args, config=config, rank=args.rank, world_size=args.world_size, device=device,
              output_dir=args.output_dir, amp=config['amp'], accum_steps=config['accum_steps'],
              scaler=torch.amp.GradScaler(device.type, enabled=config['amp'] == 'fp16'), replaces=replaces)
    run.writer = tracking.ScalarWriter(run.output_dir, backends, config, enabled=run.is_main)
    if run.distributed:
        print(f'process {run.rank} of {run.world_size} on {device} ({dist.get_backend()})', force=True)
    else:
        print(f'single process on {device}')
    return run


def check_output_dir(args):
    """configuration.check_output_dir, saying what --overwrite replaces."""
    replaced = configuration.check_output_dir(args)
    if replaced:
        print(f"--overwrite: this run replaces {', '.join(replaced)} in {args.output_dir} "
              f"(removed when it writes its first file)")
    return replaced


def default_threads(num_workers, cores=None, local_processes=None, load=None):
    """Intra-op threads for one process: the cores this process may run on (its affinity mask),
    shared among the processes started on the node, less one core per data-loader worker, and no
    more than the node's idle cores allow (its cores less the 1-minute load average, shared among
    the local processes): on a busy machine, more threads than free cores make every step many
    times slower (benchmarks/threads.py)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    if local_processes is None:
        local_processes = int(os.environ.get('LOCAL_WORLD_SIZE') or os.environ.get('SLURM_NTASKS_PER_NODE', '1')
                              .split('(')[0] or 1)
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0.0
    local_processes = max(local_processes, 1)
    idle = (os.cpu_count() or cores) - round(load)
    return max(1, min(cores // local_processes - num_workers, idle // local_processes))


def set_threads(args, config, device):
    """--num_threads, else the config's num_threads, else OMP_NUM_THREADS when set, else
    default_threads(). (DataLoader workers run one thread each.)"""
    threads = getattr(args, 'num_threads', None) or config.get('num_threads')
    if threads is None and os.environ.get('OMP_NUM_THREADS'):
        return torch.get_num_threads()
    if threads is not None and threads < 1:
        raise ConfigError(f'--num_threads: expected a positive integer, got {threads}')
    threads = threads or default_threads(config.get('num_workers', 4))
    torch.set_num_threads(threads)
    return threads


def speed_options(args, config, device):
    """Resolve amp / accum_steps / grad_checkpointing / compile: the flag, else the config key,
    else the default; the effective values are written back into the config (and config.yaml)."""
    for key in ('amp', 'accum_steps', 'grad_checkpointing', 'compile'):
        if getattr(args, key, None) is not None:
            config[key] = getattr(args, key)
    if config.get('amp') is None:
        config['amp'] = 'bf16' if device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'off'
    if config['amp'] is False:  # YAML `amp: off` reads as a boolean
        config['amp'] = 'off'
    if config['amp'] not in AMP_MODES:
        raise ConfigError(f"amp: expected one of {', '.join(AMP_MODES)}, got {config['amp']!r}")
    if config['amp'] == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise ConfigError('amp bf16: this GPU does not support bfloat16 (use --amp fp16 or --amp off)')
    config.setdefault('accum_steps', 1)
    if isinstance(config['accum_steps'], bool) or not isinstance(config['accum_steps'], int) \
            or config['accum_steps'] < 1:
        raise ConfigError(f"accum_steps: expected a positive integer, got {config['accum_steps']!r}")
    config.setdefault('grad_checkpointing', False)
    config.setdefault('compile', False)


def compiler_errors():
    """The exception classes torch.compile raises when it cannot compile (dynamo tracing, the
    backend, inductor lowering, a missing or failing C++/CUDA compiler)."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc
    names = ('OperatorIssue', 'SubgraphLoweringException', 'InvalidCxxCompiler', 'CppWrapperCodegenError',
             'CppCompileError')
    return (dynamo_exc.TorchDynamoException,) + tuple(getattr(inductor_exc, n) for n in names
                                                      if hasattr(inductor_exc, n))


def log_to_option(args, config):
    """The --log_to flag, else the config key log_to, else 'tensorboard'; the effective value
    goes back into the config (and config.yaml) as a string such as 'tensorboard,wandb' or 'none'."""
    flag = getattr(args, 'log_to', None)
    where = '--log_to' if flag is not None else f'{args.config}: log_to'
    try:
        backends = tracking.parse_log_to(flag if flag is not None else config.get('log_to'), where)
    except tracking.LogToError as error:
        raise ConfigError(str(error)) from None
    config['log_to'] = ','.join(backends) or 'none'
    return backends


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
                print(f'torch.compile failed ({type(error).__name__}: {short_message(error)}); '
                      f'continuing in eager mode', flush=True)
        return self.eager(*args, **kwargs)

    def __getattr__(self, name):  # train(), eval(), no_sync(), module, ...
        return getattr(self.eager, name)


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
    modules keep their names: state_dict keys and checkpoints are unchanged. Returns the modules.
    """
    regions = []
    for module in model.modules():
        for name in ('blocks', 'layer'):
            children = getattr(module, name, None)
            if isinstance(children, torch.nn.ModuleList):
                regions.extend(children)
    for region in regions:
        region.compile(**compile_kwargs)
    return regions


def text_padding(run):
    """'longest' (the least padding), or under --compile 'max_length', so the BERT layers see one
    text shape every step (pass truncation=True and the task's max_length with it)."""
    return 'max_length' if run.config.get('compile') else 'longest'


def build_optimization(config, model):
    optimizer = create_optimizer(utils.AttrDict(config['optimizer']), model)
    lr_scheduler, _ = create_scheduler(utils.AttrDict(config['schedular']), optimizer)
    return optimizer, lr_scheduler


# ---- data ---------------------------------------------------------------------------------------
def sample_seed(seed, epoch, index):
    return (seed * 1_000_003 + epoch) * 1_000_033 + index


class SeededSamples(torch.utils.data.Dataset):
    """Makes the random augmentation of each sample a function of (seed, epoch, index) alone.

    Indices arrive as (epoch, index) pairs from ResumableSampler; the global random generators
    (python, numpy, torch) are seeded for the sample and restored afterwards. Sample k of an epoch
    is therefore the same tensor whether the run was interrupted or not, whatever the number of
    workers. Each item comes with the number of bad images skipped to produce it
    (`skip_bad_images`), which the collate function sums, so the count reaches the main process.
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # the wrapped dataset's attributes (text, img2txt, ...)
        if name in ('dataset', 'seed'):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        epoch, index = key
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        seed = sample_seed(self.seed, epoch, index)
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        # the CPU generator only (what the transforms draw from): torch.manual_seed would also queue
        # a lazy CUDA seeding, recording a stack trace each time (milliseconds per sample)
        torch.default_generator.manual_seed(seed)
        skipped = getattr(self.dataset, 'num_skipped', 0)
        try:
            item = self.dataset[index]
            return item, getattr(self.dataset, 'num_skipped', 0) - skipped
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (also for one process) that yields (epoch, index) and can start
    mid-epoch: `set_epoch(epoch, start)` skips the first `start` samples of this rank."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        return iter([(self.epoch, i) for i in indices])


class CountSkipped:
    """Collate (item, skipped) pairs into (batch, total skipped)."""

    def __init__(self, collate_fn=None):
        self.collate_fn = collate_fn or torch.utils.data.default_collate

    def __call__(self, pairs):
        items, skipped = zip(*pairs)
        return self.collate_fn(list(items)), sum(skipped)


def default_num_workers():
    """The CPUs this process may use, shared with the other processes of its node (torchrun's
    LOCAL_WORLD_SIZE, SLURM's SLURM_NTASKS_PER_NODE), at most MAX_WORKERS and at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    per_node = int(os.environ.get('LOCAL_WORLD_SIZE') or os.environ.get('SLURM_NTASKS_PER_NODE', '1').split('(')[0])
    return max(1, min(MAX_WORKERS, cpus // max(per_node, 1)))


def num_workers_of(config):
    """The config's `num_workers`, else `default_num_workers()`."""
    value = config.get('num_workers')
    if value is None:
        return default_num_workers()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f'num_workers: expected a whole number >= 0, got {value!r}')
    return value


class StreamLoader:
    """Training batches from a `dataset.shards.ShardStream`: a DataLoader made afresh each epoch
    (its workers read the epoch and start position); the stream stands in for the sampler
    (`loader.sampler.set_epoch(epoch, start)`), as train_one_epoch expects."""

    def __init__(self, stream, **loader_kwargs):
        self.stream = self.sampler = self.dataset = stream
        self.batch_size = stream.batch_size
        self.loader_kwargs = loader_kwargs

    def __len__(self):
        return self.stream.steps

    def __iter__(self):
        # its own generator: making the iterator must not draw from the global one (exact resume)
        return iter(torch.utils.data.DataLoader(self.stream, batch_size=self.batch_size, drop_last=True,
                                                generator=torch.Generator().manual_seed(self.stream.seed),
                                                **self.loader_kwargs))


def shard_loader(dataset, batch_size, run, config, collate_fn=None):
    """The `train_shards` loader (with a JSON `dataset`, its items join the shards' samples)."""
    from dataset import build_transform
    from dataset.shards import DEFAULT_SHUFFLE_BUFFER, ShardStream, expand, shard_sizes
    urls = expand(config['train_shards'])
    sizes = None
    if run.is_main:
        sizes = shard_sizes(urls, progress=True)
    if run.distributed:
        shared = [sizes]
        dist.broadcast_object_list(shared, src=0)
        sizes = shared[0]
    num_workers = num_workers_of(config)
    transform = build_transform('pretrain' if config.get('augment', True) else 'test', config['image_res'],
                                config.get('randaugment_autocontrast', 'original'), uint8=True,
                                jpeg_draft=bool(config.get('jpeg_draft', False)))
    stream = ShardStream(urls, transform, batch_size=batch_size, num_workers=num_workers, rank=run.rank,
                         world_size=run.world_size, seed=run.args.seed, sizes=sizes,
                         samples_per_epoch=config.get('samples_per_epoch'),
                         shuffle_buffer=config.get('shuffle_buffer', DEFAULT_SHUFFLE_BUFFER), json_dataset=dataset)
    print(f'{stream.samples_per_epoch} samples per epoch ({sum(sizes)} in {len(urls)} shards'
          f'{f", {len(dataset)} from train_file" if dataset is not None else ""}): {stream.steps} steps of '
          f'{batch_size} x {run.world_size} processes, {num_workers} loader workers each')
    return StreamLoader(stream, num_workers=num_workers, collate_fn=CountSkipped(collate_fn),
                        pin_memory=run.device.type == 'cuda', worker_init_fn=_worker_init)


def train_loader(dataset, batch_size, run, config, collate_fn=None):
    """Shuffled, resumable training batches; iterating yields (batch, images skipped). With the
    config key `train_shards` the batches stream from tar shards (`shard_loader`)."""
    if config.get('train_shards'):
        return shard_loader(dataset, batch_size, run, config, collate_fn)
    sampler = ResumableSampler(dataset, run.world_size, run.rank, seed=run.args.seed)
    check_batch_count(len(dataset), batch_size, run, getattr(dataset, 'ann_files', None))
    if run.tokenizer is not None:
        check_vocabulary(dataset, run)
    num_workers = num_workers_of(config)
    return torch.utils.data.DataLoader(
        SeededSamples(dataset, run.args.seed), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=CountSkipped(collate_fn), drop_last=True, pin_memory=run.device.type == 'cuda',
        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(run.args.seed),
        worker_init_fn=_worker_init)


def _worker_init(worker_id):
    # the main process decides when to stop (SIGINT from Ctrl-C and SLURM's SIGTERM reach the workers too)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def check_batch_count(num_items, batch_size, run, files=None):
    """Too few items for one batch per process is an error; the items that drop_last leaves out of
    every epoch are reported once."""
    if getattr(run.args, 'evaluate', False):
        return
    where = f" in {', '.join(map(str, files))}" if files else ''
    per_process = -(-num_items // run.world_size)  # DistributedSampler pads every rank to this
    if num_items < batch_size * run.world_size:
        raise ConfigError(f'{num_items} training items{where} are too few for one batch of {batch_size} in each of '
                          f'{run.world_size} process(es) (at least {batch_size * run.world_size} needed): lower '
                          f'batch_size in {run.args.config} or add items')
    steps = per_process // batch_size
    used = steps * batch_size * run.world_size
    if used < num_items:
        print(f'drop_last: {num_items - used} of {num_items} training items are left out of each epoch '
              f'({steps} batches of {batch_size} in each of {run.world_size} process(es))')


def check_vocabulary(dataset, run, limit=0.05):
    """Warn once when more than `limit` of the word pieces of the training texts are [UNK]."""
    from dataset.check import unk_report
    message = unk_report(dataset, run.tokenizer, run.config['text_encoder'], limit=limit)
    if message:
        print(f'warning: {message}', file=sys.stderr, flush=True)


def eval_loader(dataset, batch_size, run, config, collate_fn=None, distributed=True):
    """Evaluation order is the file order; with `distributed`, each rank takes every world-th item
    (no padding, so nothing is counted twice)."""
    sampler = None
    if distributed and run.distributed:
        sampler = list(range(run.rank, len(dataset), run.world_size))
    num_workers = num_workers_of(config)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate_fn, shuffle=False, drop_last=False,
                                       pin_memory=run.device.type == 'cuda', worker_init_fn=_worker_init)


# ---- training -----------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where training stands: the next iteration is `step` of `epoch`."""
    epoch: int = 0
    step: int = 0
    meters: dict = None
    best: float = None
    best_epoch: int = None
    extra: dict = field(default_factory=dict)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (SLURM pre-emption, `kill`) while `fit` trains are remembered
    instead of stopping the process mid-step: the loop asks `requested(run)` between optimizer
    steps, which every rank answers the same (the signal any rank received), so all ranks stop
    together at the same step. A second signal is taken as the same request (torchrun passes a
    Ctrl-C on to its workers, which had it already); before training, and at a third signal,
    SIGINT stops at once (KeyboardInterrupt) and SIGTERM ends the process as usual. `launch`
    installs the handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.count, self.active, self.previous, self.group = 0, 0, False, {}, None

    def _handle(self, signum, frame):
        self.count += 1
        if not self.active or self.count > 2:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = self.signum or signum

    def install(self):
        self.signum, self.count, self.active = 0, 0, False
        try:
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: the handlers stay as they are
            self.previous = {}

    def uninstall(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous, self.active, self.group = {}, False, None

    def start(self, run):
        """Training begins: defer signals from now on (only where `launch` installed the handlers)."""
        if not self.previous:
            return
        if run.distributed and self.group is None:
            # a CPU group for the flag, so asking every step needs no device synchronisation
            self.group = dist.new_group(backend='gloo') if dist.get_backend() != 'gloo' else dist.group.WORLD
        self.active = True

    def requested(self, run):
        """The signal number to stop for (0: go on), the same on every rank."""
        if not self.active:
            return 0
        if not run.distributed:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


SIGNALS = StopSignals()


def stop(signum, epoch, step, what):
    """End training after a signal: exit status 128 + the signal number (130 SIGINT, 143 SIGTERM)."""
    raise Interrupted(f'interrupted at epoch {epoch}, step {step}; {what}; continue with --resume', 128 + signum)


def _since(checkpointer):
    name = os.path.basename(checkpointer.last_saved) if checkpointer and checkpointer.last_saved else None
    return f'nothing trained since {name}' if name else 'nothing was trained, so no checkpoint was written'


class LossGuard:
    """Remembers the first non-finite loss without reading the loss back every step: the step's
    code (epoch * 10^9 + step) is kept on the loss's device, and read by `check` only."""

    def __init__(self):
        self.first = None

    def update(self, loss, epoch, step):
        if self.first is None:  # -1: no bad step yet (made once, on the device)
            self.first = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        # the code goes in as a Python number (a kernel argument), not as a tensor copied over
        self.first = torch.where(bad & (self.first < 0), epoch * 10 ** 9 + step, self.first)

    def check(self):
        if self.first is not None and int(self.first) >= 0:
            epoch, step = divmod(int(self.first), 10 ** 9)
            raise NonFiniteLossError(f'the loss became non-finite at epoch {epoch}, step {step}; stopping '
                                     f'(the last checkpoint written before it is kept)')


def train_one_epoch(model, loader, optimizer, lr_scheduler, epoch, run, state, train_step, checkpointer=None,
                    alpha_ramp=True, digits=3):
    """One epoch: `train_step(model, batch, alpha)` returns a dict of named losses, which are
    summed, back-propagated and logged. Owns the alpha ramp of epoch 0, the warm-up stepping of
    the scheduler every 100 iterations, the non-finite-loss stop and mid-epoch checkpoints.
    Returns the epoch averages as numbers: the losses rounded to `digits` decimals (the precision
    the original prints), the lr to `digits` significant digits."""
    config = run.config
    model.train()
    logger = utils.MetricLogger(delimiter='  ')
    logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    if state.step and state.meters:
        logger.load_state_dict(state.meters)
    num_steps = len(loader)
    loader.sampler.set_epoch(epoch, start=state.step * loader.batch_size)
    warmup_iterations = config['schedular']['warmup_epochs'] * WARMUP_STEP_SIZE
    save_every = config.get('save_every_steps') or 0
    print_freq = config.get('print_freq', 50)
    guard = LossGuard()
    skipped = state.extra.get('skipped_images', 0) if state.step else 0
    saved_step = state.step  # the step the newest checkpoint continues from

    accum = run.accum_steps
    bare_model = getattr(model, 'module', model)  # under DistributedDataParallel
    # the step line's numbers also go to TensorBoard / W&B, at the global step (the same after a resume)
    on_log = None
    if run.writer is not None and run.writer.active:
        def on_log(i, numbers):
            run.writer.step(epoch * num_steps + i, numbers)
    for i, (batch, skipped_now) in logger.log_every(loader, print_freq, f'Train Epoch: [{epoch}]', start=state.step,
                                     total=num_steps, samples_per_step=loader.batch_size * run.world_size,
                                     on_log=on_log):
        alpha = config.get('alpha', 0)
        if epoch == 0 and alpha_ramp:
            alpha = alpha * min(1, i / num_steps)
        if config.get('compile'):  # a tensor: a new value each step is new data, not a new graph
            alpha = torch.tensor(alpha, dtype=torch.float32)
        skipped += skipped_now
        # accumulation: the momentum encoders move once per optimizer step (on its first micro-batch)
        # and the gradients are all-reduced only on its last
        last_micro = (i + 1) % accum == 0 or i + 1 == num_steps
        bare_model.momentum_paused = i % accum != 0
        sync = contextlib.nullcontext() if last_micro or not run.distributed else model.no_sync()
        with sync:
            with run.autocast():
                losses = train_step(model, batch, alpha)
                loss = sum(losses.values())
            run.scaler.scale(loss / accum if accum > 1 else loss).backward()
        if last_micro:
            run.scaler.step(optimizer)
            run.scaler.update()
            optimizer.zero_grad(set_to_none=True)
        guard.update(loss, epoch, i)
        logger.update(lr=optimizer.param_groups[0]['lr'], **{k: v.detach() for k, v in losses.items()})
        if epoch == 0 and i % WARMUP_STEP_SIZE == 0 and i <= warmup_iterations:
            lr_scheduler.step(i // WARMUP_STEP_SIZE)
        state.step = i + 1
        if i % print_freq == 0:
            guard.check()
        if checkpointer and save_every and state.step % save_every == 0 and state.step % accum == 0 \
                and state.step < num_steps:
            guard.check()
            state.meters, state.extra['skipped_images'] = logger.state_dict(), skipped
            checkpointer.save('checkpoint_last.pth', state)
            saved_step = state.step
        # a signal stops between optimizer steps; at the epoch's last step the epoch is finished first
        if SIGNALS.active and state.step % accum == 0 and state.step < num_steps \
                and (signum := SIGNALS.requested(run)):
            if checkpointer and state.step > saved_step:
                guard.check()
                state.meters, state.extra['skipped_images'] = logger.state_dict(), skipped
                checkpointer.save('checkpoint_last.pth', state)
                saved_step = state.step
            written = checkpointer and checkpointer.last_saved == checkpointer.run.path('checkpoint_last.pth') \
                and saved_step == state.step
            stop(signum, epoch, state.step, 'checkpoint_last.pth written' if written else _since(checkpointer))
    bare_model.momentum_paused = False
    guard.check()
    logger.synchronize_between_processes()
    print('Averaged stats:', logger.global_avg())
    state.step, state.meters = 0, None
    stats = {name: float(f'{meter.global_avg:.{digits}g}') if name == 'lr' else round(meter.global_avg, digits)
             for name, meter in logger.meters.items()}
    if config.get('skip_bad_images') or config.get('train_shards'):  # shards always skip and count
        stats['skipped_images'] = int(utils.all_reduce_sum(torch.tensor(skipped)).item())
    return stats


def fit(model, loader, optimizer, lr_scheduler, run, state, checkpointer, train_step, evaluate=None,
        best_key=None, evaluate_only=False, alpha_ramp=True, digits=3):
    """The epoch loop of every script: train one epoch, evaluate, log one JSON line, step the
    schedule, checkpoint.

    With `evaluate(epoch) -> {name: value}` (fine-tuning) the evaluation runs after every epoch,
    `checkpoint_best.pth` keeps the epoch with the highest `best_key`, `checkpoint_last.pth` the
    newest, and log.txt ends with 'best epoch: N'. Without it (pre-training, VQA) every epoch
    is kept as `checkpoint_NN.pth`. `evaluate_only` evaluates once and writes only the log.
    `digits`: the rounding of the training averages (see `train_one_epoch`).
    """
    warmup_epochs = run.config['schedular']['warmup_epochs']
    print('Start evaluation' if evaluate_only else 'Start training')
    SIGNALS.start(run)
    for epoch in range(state.epoch, run.config['schedular']['epochs']):
        state.epoch = epoch
        stats = {}
        if not evaluate_only:
            train_stats = train_one_epoch(model, loader, optimizer, lr_scheduler, epoch, run, state,
                                          lambda m, b, a: train_step(m, b, a, run), checkpointer,
                                          alpha_ramp=alpha_ramp, digits=digits)
            stats.update({f'train_{k}': v for k, v in train_stats.items()})
        if evaluate is not None:
            with run.eval_precision():
                stats.update(evaluate(epoch))
        if evaluate_only:
            log_stats(run, {**stats, 'epoch': epoch})
            return stats
        lr_scheduler.step(epoch + warmup_epochs + 1)
        state.epoch = epoch + 1
        if evaluate is None:
            checkpointer.save(f'checkpoint_{epoch:02d}.pth', state, epoch=epoch)
            checkpointer.prune(run.config.get('keep_checkpoints'))
        else:
            if state.best is None or float(stats[best_key]) > state.best:
                state.best, state.best_epoch = float(stats[best_key]), epoch
                checkpointer.save('checkpoint_best.pth', state, epoch=epoch)
            checkpointer.save('checkpoint_last.pth', state, epoch=epoch)
        log_stats(run, {**stats, 'epoch': epoch})  # only once the epoch's checkpoints are safely on disk
        if epoch + 1 < run.config['schedular']['epochs'] and (signum := SIGNALS.requested(run)):
            stop(signum, epoch + 1, 0, f'{os.path.basename(checkpointer.last_saved)} written')
    if evaluate is not None and run.is_main and state.best_epoch is not None:
        with open(run.path('log.txt'), 'a') as f:
            f.write(f'best epoch: {state.best_epoch}\n')
    check_replicas(model, run)
    SIGNALS.active = False  # what the script does after training stops at a signal as before
    return None


def check_replicas(model, run):
    """With several processes: every process's final weights hash to the same value (they would
    differ after a data-loading or synchronisation bug); rank 0 prints the hashes."""
    if not run.distributed:
        return
    import hashlib
    digest = hashlib.sha256()
    for name, tensor in getattr(model, 'module', model).state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    hashes = [None] * run.world_size
    dist.all_gather_object(hashes, digest.hexdigest()[:16])
    print(f'final weights sha256 on each process: {" ".join(hashes)}')
    if len(set(hashes)) > 1:
        raise RuntimeError(f'the processes finished with different weights: {hashes}')


# ---- checkpoints --------------------------------------------------------------------------------
def _rng_state():
    # numpy's key array as a tensor, so the checkpoint loads with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {'python': random.getstate(), 'numpy': numpy_state, 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    random.setstate(state['python'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


DISK_FULL = {errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC)}


def _disk_full(error):
    """Whether `error` (or an error it wraps: torch.save reports a failed write as a RuntimeError)
    is a full disk or an exceeded quota."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return True
        if 'No space left on device' in str(error) or 'Disk quota exceeded' in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def atomic_save(obj, path):
    """Write to a temporary file beside `path`, then rename: a crash never leaves a torn file, and a
    failed write (a full disk: DiskFullError) leaves no temporary file behind."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(error, Exception) and _disk_full(error):
            raise DiskFullError(errno.ENOSPC, f'no space left on device writing {path}') from None
        raise


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly where it stopped."""

    def __init__(self, run, model, optimizer, lr_scheduler):
        self.run, self.model, self.optimizer, self.lr_scheduler = run, model, optimizer, lr_scheduler
        self.last_saved = None  # the newest checkpoint file this run wrote or resumed from

    def save(self, filename, state, epoch=None):
        """Rank 0 writes {'model', 'optimizer', 'lr_scheduler', 'config', 'epoch'} (the original's
        format) plus what exact resume needs: position, meters and every rank's RNG states."""
        rng = _rng_state()
        if self.run.distributed:  # every rank's RNG states and meters (the epoch averages sum them)
            gathered = [None] * self.run.world_size
            dist.all_gather_object(gathered, (rng, state.meters))
            rng, meters = [g[0] for g in gathered], [g[1] for g in gathered]
        else:
            rng, meters = [rng], [state.meters]
        error = None
        if self.run.is_main:
            self.run.write_config()
            try:
                self._write(filename, state, epoch, rng, meters)
            except DiskFullError as e:
                last = self.last_saved or 'none (no checkpoint was written)'
                error = f'{e.strerror}; the last good checkpoint is {last}'
        if self.run.distributed:  # every rank learns whether rank 0 could write (and waits for it)
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise DiskFullError(errno.ENOSPC, error)
        self.last_saved = self.run.path(filename)

    def _write(self, filename, state, epoch, rng, meters):
        atomic_save({
            'model': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'lr_scheduler': self.lr_scheduler.state_dict(),
            'config': self.run.config,
            'epoch': state.epoch if epoch is None else epoch,
            'resume': {'epoch': state.epoch, 'step': state.step, 'meters': state.meters, 'best': state.best,
                       'best_epoch': state.best_epoch, 'extra': state.extra, 'rng': rng, 'rank_meters': meters,
                       'scaler': self.run.scaler.state_dict() if self.run.scaler.is_enabled() else None},
        }, self.run.path(filename))

    def prune(self, keep):
        """Keep the newest `keep` epoch checkpoints (checkpoint_NN.pth); None keeps all."""
        if keep is None or not self.run.is_main:
            return
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f'keep_checkpoints: expected a positive integer, got {keep!r}')
        names = sorted(n for n in os.listdir(self.run.output_dir)
                       if n.startswith('checkpoint_') and n.endswith('.pth') and n[11:-4].isdigit())
        for name in names[:-keep]:
            os.remove(self.run.path(name))

    def newest(self):
        """(path, checkpoint) of the checkpoint in output_dir that is furthest along, or None.

        Each candidate is opened memory-mapped with the restricted unpickler (`weights_only`):
        only its small 'resume' entry is read from disk, not the weights of a multi-GB file, and
        the chosen one's tensors are read when they are used."""
        best, best_position = None, None
        if not os.path.isdir(self.run.output_dir):
            return None
        for name in sorted(os.listdir(self.run.output_dir)):
            if not (name.startswith('checkpoint') and name.endswith('.pth')):
                continue
            path = self.run.path(name)
            try:
                ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            except Exception as e:
                print(f'skipping unreadable {path}: {short_message(e)}')
                continue
            if not isinstance(ckpt, dict):
                print(f'skipping {path}: not a training checkpoint')
                continue
            resume = ckpt.get('resume')
            position = (resume['epoch'], resume['step']) if resume else (ckpt.get('epoch', -1) + 1, 0)
            if best_position is None or position > best_position:
                best, best_position = (path, ckpt), position
        return best

    def resume(self):
        """Restore model, optimizer, scheduler, position and RNGs from the newest checkpoint."""
        found = self.newest()
        if found is None:
            raise CheckpointError(f'--resume: no checkpoint to resume from in {self.run.output_dir}')
        path, ckpt = found
        self.model.load_state_dict(ckpt['model'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        self.lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
        resume = ckpt.get('resume') or {'epoch': ckpt['epoch'] + 1, 'step': 0}
        meters = resume.get('rank_meters')
        meters = meters[self.run.rank] if meters and len(meters) == self.run.world_size else resume.get('meters')
        state = TrainState(epoch=resume['epoch'], step=resume['step'], meters=meters,
                           best=resume.get('best'), best_epoch=resume.get('best_epoch'),
                           extra=resume.get('extra') or {})
        if resume.get('scaler') and self.run.scaler.is_enabled():
            self.run.scaler.load_state_dict(resume['scaler'])
        rng = resume.get('rng')
        if rng and len(rng) == self.run.world_size:
            _set_rng_state(rng[self.run.rank])
        elif rng:
            print(f'resuming with {self.run.world_size} processes from a run with {len(rng)}: '
                  f'random streams are not continued')
        self.last_saved = path
        print(f'resumed from {path} at epoch {state.epoch}, step {state.step}')
        return state


def start_state(args, run, model, optimizer, lr_scheduler, **load_kwargs):
    """--resume: continue from output_dir; else load --checkpoint (if any) into the model."""
    checkpointer = Checkpointer(run, model, optimizer, lr_scheduler)
    if args.resume:
        return checkpointer, checkpointer.resume()
    if args.checkpoint:
        trust = bool(getattr(args, 'trust_checkpoint', None) or run.config.get('trust_checkpoint'))
        load_checkpoint(model, args.checkpoint, trust=trust, **load_kwargs)
    return checkpointer, TrainState()


def log_stats(run, stats):
    """One JSON line per epoch in output_dir/log.txt (rank 0), every value a JSON number (numpy and
    torch scalars become Python numbers; a string is an error), and the same numbers to
    TensorBoard / W&B under `epoch/<key>`."""
    numbers = {}
    for key, value in stats.items():
        number = tracking.as_number(value)
        if number is None:
            raise TypeError(f'log_stats: {key!r} must be a number, got {type(value).__name__} {value!r}')
        numbers[key] = number
    if run.is_main:
        run.write_config()
        with open(run.path('log.txt'), 'a') as f:
            f.write(json.dumps(numbers) + '\n')
        if run.writer is not None:
            run.writer.epoch(numbers)


# ---- entry point --------------------------------------------------------------------------------
def short_message(error):
    """The last line of an error message (DataLoader workers wrap theirs in a traceback)."""
    text = str(error).strip() or type(error).__name__
    last = text.splitlines()[-1]
    for prefix in ('dataset.base.DataError: ', 'DataError: '):
        if last.startswith(prefix):
            last = last[len(prefix):]
    return last


def launch(main, parser, argv=None):
    """Parse arguments and run `main(args)`; bad input ends with a one-line error and exit status 2."""
    from dataset import DataError
    args = parser.parse_args(argv)
    SIGNALS.install()
    try:
        main(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, NonFiniteLossError, DiskFullError) as error:
        message = error.strerror if isinstance(error, DiskFullError) else short_message(error)
        print(f'error: {message}', file=sys.stderr, flush=True)
        sys.exit(2)
    except Interrupted as interrupt:
        print(interrupt, file=sys.stderr, flush=True)
        sys.exit(interrupt.code)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print('interrupted; nothing more was written (continue with --resume from the last checkpoint, if any)',
              file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        SIGNALS.uninstall()
        tracking.close_all()
        if utils.is_dist_avail_and_initialized():
            dist.destroy_process_group()


# ---- evaluation helpers shared by the task scripts ----
def split_evaluator(loaders, score):
    """The `evaluate(epoch)` of `fit`: {'<split>_<metric>': value} over the named loaders
    ({'val': ..., 'test': ...}), where `score(loader)` returns {metric: value}."""
    def evaluate(epoch):
        stats = {}
        for split, loader in loaders.items():
            result = score(loader)
            print(f'{split}: {result}')
            stats.update({f'{split}_{k}': v for k, v in result.items()})
        return stats
    return evaluate


@torch.no_grad()
def evaluate_accuracy(model, loader, run, unpack):
    """Classification accuracy of `model` over a whole split: {'acc': fraction}, rounded to 4 decimals
    as the original prints it.

    With an `eval_loader(..., distributed=True)` each rank scores its own share and the counts are
    summed over ranks, so every example counts exactly once. `unpack(batch)` returns
    (image, texts, targets); texts are tokenised with padding='longest'.
    """
    model.eval()
    counts = torch.zeros(2, dtype=torch.long, device=run.device)  # correct, seen
    for batch in loader:
        image, text, targets = unpack(batch)
        image, targets = image.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        text_input = run.tokenizer(text, padding='longest', return_tensors='pt').to(run.device)
        prediction = model(image, text_input, targets, train=False)
        counts[0] += (prediction.argmax(dim=1) == targets).sum()
        counts[1] += targets.numel()
    correct, seen = utils.all_reduce_sum(counts).tolist()
    return {'acc': round(correct / max(seen, 1), 4)}
