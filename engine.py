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
import difflib
import json
import os
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

import utils
from models.checkpoint import CheckpointError, load_checkpoint
from models.tokenization_bert import BertTokenizer
from optim import create_optimizer
from scheduler import create_scheduler

WARMUP_STEP_SIZE = 100  # the warm-up advances the scheduler every 100 iterations of epoch 0

# keys every task config may carry besides its own
COMMON_KEYS = {
    'bert_config', 'image_res', 'vision_width', 'vision_depth', 'vision_num_heads', 'patch_size',
    'text_encoder', 'init_text_encoder', 'num_workers', 'print_freq', 'save_every_steps',
    'skip_bad_images', 'check_images', 'augment', 'optimizer', 'schedular',
    'amp', 'accum_steps', 'grad_checkpointing', 'compile', 'trust_checkpoint',
}
AMP_MODES = ('bf16', 'fp16', 'off')
OPTIMIZER_KEYS = {'opt', 'lr', 'weight_decay'}
SCHEDULER_KEYS = {'sched', 'lr', 'epochs', 'min_lr', 'decay_rate', 'warmup_lr', 'warmup_epochs',
                  'cooldown_epochs'}


class ConfigError(ValueError):
    """A configuration problem, with the file and key in the message."""


class NonFiniteLossError(FloatingPointError):
    pass


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
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    speed = parser.add_argument_group('speed and memory (each also a config key of the same name)')
    speed.add_argument('--amp', choices=AMP_MODES, default=None,
                       help='mixed precision for training (default: bf16 on GPUs that support it, else off)')
    speed.add_argument('--grad_checkpointing', default=None, action=argparse.BooleanOptionalAction,
                       help='recompute the online encoders\' activations in the backward pass (less memory)')
    speed.add_argument('--accum_steps', type=int, default=None,
                       help='micro-batches per optimizer step (gradient accumulation; default 1)')
    speed.add_argument('--compile', default=None, action=argparse.BooleanOptionalAction,
                       help='torch.compile the model; falls back to eager mode where that fails')
    return parser


def load_yaml(path):
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    try:
        with open(path) as f:
            config = YAML(typ='safe').load(f)
    except MarkedYAMLError as e:
        mark = e.problem_mark
        raise ConfigError(f'{path}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {e.problem}') from None
    except YAMLError as e:
        raise ConfigError(f'{path}: YAML syntax error: {e}') from None
    if not isinstance(config, dict):
        raise ConfigError(f'{path}: expected a mapping of keys to values at the top level')
    return config


def check_keys(config, path, required, optional, section=''):
    """Every required key present, and no key outside required | optional (with a suggestion)."""
    where = f'{path}: {section}' if section else f'{path}: '
    known = set(required) | set(optional)
    for key in config:  # unknown keys first: a misspelt required key is reported with its fix
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            raise ConfigError(f"{where}unknown key '{key}'{hint}")
    for key in sorted(required):
        if key not in config:
            raise ConfigError(f"{where}missing required key '{key}'")


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
    _config_written: bool = False

    def autocast(self):
        """The training-step precision context (a no-op with amp 'off')."""
        dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(self.amp, torch.float32)
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp != 'off')

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
        with open(self.path('config.yaml'), 'w') as f:
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
    config.setdefault('text_encoder', 'bert-base-uncased')
    if args.text_encoder:
        config['text_encoder'] = args.text_encoder
    speed_options(args, config, device)
    run = Run(args=args, config=config, rank=args.rank, world_size=args.world_size, device=device,
              output_dir=args.output_dir, amp=config['amp'], accum_steps=config['accum_steps'],
              scaler=torch.amp.GradScaler(device.type, enabled=config['amp'] == 'fp16'))
    if run.distributed:
        print(f'process {run.rank} of {run.world_size} on {device} ({dist.get_backend()})', force=True)
    else:
        print(f'single process on {device}')
    return run


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


class CompileFallback:
    """Calls the torch.compile'd model, and the eager one for good once compiling fails."""

    def __init__(self, compiled, eager):
        self.compiled, self.eager, self.failed = compiled, eager, False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:  # torch._dynamo / inductor errors vary by platform
                self.failed = True
                print(f'torch.compile failed ({short_message(error)}); continuing in eager mode', flush=True)
        return self.eager(*args, **kwargs)

    def __getattr__(self, name):  # train(), eval(), no_sync(), module, ...
        return getattr(self.eager, name)


def build_tokenizer(config):
    return BertTokenizer.from_pretrained(config['text_encoder'])


def bert_weights(config):
    """Where the text encoder's pretrained weights come from (None: random initialisation)."""
    return config['text_encoder'] if config.get('init_text_encoder', True) else None


def wrap_model(model, run, find_unused_parameters=False):
    """(model to call, the bare model): DistributedDataParallel only with several processes, with
    gradient checkpointing and torch.compile when asked for."""
    model = model.to(run.device)
    if run.config.get('grad_checkpointing'):
        model.set_grad_checkpointing(True)
    wrapped = model
    if run.distributed:
        device_ids = [run.device.index] if run.device.type == 'cuda' else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                            find_unused_parameters=find_unused_parameters)
    if run.config.get('compile'):
        wrapped = CompileFallback(torch.compile(wrapped), wrapped)
    return wrapped, model


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
        torch.manual_seed(seed)
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


def train_loader(dataset, batch_size, run, config, collate_fn=None):
    """Shuffled, resumable training batches; iterating yields (batch, images skipped)."""
    sampler = ResumableSampler(dataset, run.world_size, run.rank, seed=run.args.seed)
    num_workers = config.get('num_workers', 4)
    return torch.utils.data.DataLoader(
        SeededSamples(dataset, run.args.seed), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=CountSkipped(collate_fn), drop_last=True, pin_memory=run.device.type == 'cuda',
        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(run.args.seed))


def eval_loader(dataset, batch_size, run, config, collate_fn=None, distributed=True):
    """Evaluation order is the file order; with `distributed`, each rank takes every world-th item
    (no padding, so nothing is counted twice)."""
    sampler = None
    if distributed and run.distributed:
        sampler = list(range(run.rank, len(dataset), run.world_size))
    num_workers = config.get('num_workers', 4)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate_fn, shuffle=False, drop_last=False,
                                       pin_memory=run.device.type == 'cuda')


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


class LossGuard:
    """Remembers the first non-finite loss without reading the loss back every step."""

    def __init__(self):
        self.first = None

    def update(self, loss, epoch, step):
        code = torch.tensor(epoch * 10 ** 9 + step, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        first = torch.full_like(code, -1) if self.first is None else self.first
        self.first = torch.where(bad & (first < 0), code, first)

    def check(self):
        if self.first is not None and int(self.first) >= 0:
            epoch, step = divmod(int(self.first), 10 ** 9)
            raise NonFiniteLossError(f'the loss became non-finite at epoch {epoch}, step {step}; stopping '
                                     f'(the last checkpoint written before it is kept)')


def train_one_epoch(model, loader, optimizer, lr_scheduler, epoch, run, state, train_step, checkpointer=None,
                    alpha_ramp=True, fmt='{:.3f}'):
    """One epoch: `train_step(model, batch, alpha)` returns a dict of named losses, which are
    summed, back-propagated and logged. Owns the alpha ramp of epoch 0, the warm-up stepping of
    the scheduler every 100 iterations, the non-finite-loss stop and mid-epoch checkpoints."""
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

    accum = run.accum_steps
    bare_model = getattr(model, 'module', model)  # under DistributedDataParallel
    for i, (batch, skipped_now) in logger.log_every(loader, print_freq, f'Train Epoch: [{epoch}]', start=state.step,
                                     total=num_steps, samples_per_step=loader.batch_size * run.world_size):
        alpha = config.get('alpha', 0)
        if epoch == 0 and alpha_ramp:
            alpha = alpha * min(1, i / num_steps)
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
    bare_model.momentum_paused = False
    guard.check()
    logger.synchronize_between_processes()
    print('Averaged stats:', logger.global_avg())
    state.step, state.meters = 0, None
    stats = {name: fmt.format(meter.global_avg) for name, meter in logger.meters.items()}
    if config.get('skip_bad_images'):
        stats['skipped_images'] = int(utils.all_reduce_sum(torch.tensor(skipped)).item())
    return stats


def fit(model, loader, optimizer, lr_scheduler, run, state, checkpointer, train_step, evaluate=None,
        best_key=None, evaluate_only=False, alpha_ramp=True, fmt='{:.3f}'):
    """The epoch loop of every script: train one epoch, evaluate, log one JSON line, step the
    schedule, checkpoint.

    With `evaluate(epoch) -> {name: value}` (fine-tuning) the evaluation runs after every epoch,
    `checkpoint_best.pth` keeps the epoch with the highest `best_key`, `checkpoint_last.pth` the
    newest, and log.txt ends with 'best epoch: N'. Without it (pre-training, VQA) every epoch
    is kept as `checkpoint_NN.pth`. `evaluate_only` evaluates once and writes only the log.
    """
    warmup_epochs = run.config['schedular']['warmup_epochs']
    print('Start evaluation' if evaluate_only else 'Start training')
    for epoch in range(state.epoch, run.config['schedular']['epochs']):
        state.epoch = epoch
        stats = {}
        if not evaluate_only:
            train_stats = train_one_epoch(model, loader, optimizer, lr_scheduler, epoch, run, state,
                                          lambda m, b, a: train_step(m, b, a, run), checkpointer,
                                          alpha_ramp=alpha_ramp, fmt=fmt)
            stats.update({f'train_{k}': v for k, v in train_stats.items()})
        if evaluate is not None:
            stats.update(evaluate(epoch))
        log_stats(run, {**stats, 'epoch': epoch})
        if evaluate_only:
            return stats
        lr_scheduler.step(epoch + warmup_epochs + 1)
        state.epoch = epoch + 1
        if evaluate is None:
            checkpointer.save(f'checkpoint_{epoch:02d}.pth', state, epoch=epoch)
            continue
        if state.best is None or float(stats[best_key]) > state.best:
            state.best, state.best_epoch = float(stats[best_key]), epoch
            checkpointer.save('checkpoint_best.pth', state, epoch=epoch)
        checkpointer.save('checkpoint_last.pth', state, epoch=epoch)
    if evaluate is not None and run.is_main and state.best_epoch is not None:
        with open(run.path('log.txt'), 'a') as f:
            f.write(f'best epoch: {state.best_epoch}\n')
    return None


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


def atomic_save(obj, path):
    """Write to a temporary file beside `path`, then rename: a crash never leaves a torn file."""
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly where it stopped."""

    def __init__(self, run, model, optimizer, lr_scheduler):
        self.run, self.model, self.optimizer, self.lr_scheduler = run, model, optimizer, lr_scheduler

    def save(self, filename, state, epoch=None):
        """Rank 0 writes {'model', 'optimizer', 'lr_scheduler', 'config', 'epoch'} (the original's
        format) plus what exact resume needs: position, meters and every rank's RNG states."""
        rng = _rng_state()
        if self.run.distributed:
            gathered = [None] * self.run.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        if self.run.is_main:
            self.run.write_config()
            atomic_save({
                'model': self.model.state_dict(),
                'optimizer': self.optimizer.state_dict(),
                'lr_scheduler': self.lr_scheduler.state_dict(),
                'config': self.run.config,
                'epoch': state.epoch if epoch is None else epoch,
                'resume': {'epoch': state.epoch, 'step': state.step, 'meters': state.meters, 'best': state.best,
                           'best_epoch': state.best_epoch, 'extra': state.extra, 'rng': rng,
                           'scaler': self.run.scaler.state_dict() if self.run.scaler.is_enabled() else None},
            }, self.run.path(filename))
        utils.barrier()

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
        state = TrainState(epoch=resume['epoch'], step=resume['step'], meters=resume.get('meters'),
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
    """One JSON line per epoch in output_dir/log.txt (rank 0)."""
    if run.is_main:
        run.write_config()
        with open(run.path('log.txt'), 'a') as f:
            f.write(json.dumps(stats) + '\n')


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
    try:
        main(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, NonFiniteLossError) as error:
        print(f'error: {short_message(error)}', file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
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
    """Classification accuracy of `model` over a whole split, as the original logs it: {'acc': '0.xxxx'}.

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
    return {'acc': '{:.4f}'.format(correct / max(seen, 1))}
