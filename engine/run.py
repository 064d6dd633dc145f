"""Process and device setup: `setup(args, task)` reads and checks the task config,
joins the process group when a launcher started several processes, picks the device, seeds, sets
the CPU threads and builds the tokenizer, and returns a `Run`: everything the rest of the script
reads about this process. Nothing is written back into `args` or the caller's config."""
import argparse
import contextlib
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from ruamel.yaml import YAML

import configuration
import dataset.loaders
import tracking
import utils
from configuration import ConfigError
from .build import build_tokenizer
from .options import effective_config


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
    replaces: list = field(default_factory=list)  # --overwrite: the earlier run's files (see start_output)
    _output_started: bool = False

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def evaluating(self):
        """--evaluate: the script only evaluates its checkpoint."""
        return bool(getattr(self.args, 'evaluate', False))

    @property
    def seed(self):
        return self.args.seed

    def path(self, name):
        return os.path.join(self.output_dir, name)

    def autocast(self):
        """The training-step precision context (a no-op with amp 'off')."""
        dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(self.amp, torch.float32)
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp != 'off')

    @contextlib.contextmanager
    def eval_precision(self):
        """Evaluation precision: float32 (TF32 off) by default; with eval_amp (--eval_amp or the
        config key) the training amp."""
        if self.config.get('eval_amp'):
            with self.autocast():
                yield
            return
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def start_output(self):
        """Called before every file the run writes (a checkpoint, the epoch log); the first call on
        rank 0 removes the earlier run's files that --overwrite replaces (`remove_replaced`, which
        names them) and writes the effective config (`write_config`). Nothing is removed or written
        before that, so a run that fails on bad input leaves an existing output_dir untouched."""
        if self._output_started or not self.is_main:
            return
        remove_replaced(self.output_dir, self.replaces)
        self.write_config()
        self._output_started = True

    def write_config(self):
        """Write the effective config to output_dir/config.yaml (--evaluate beside a training
        run's: config_evaluate.yaml)."""
        os.makedirs(self.output_dir, exist_ok=True)
        name = 'config.yaml'
        if self.evaluating and os.path.exists(self.path(name)):
            name = 'config_evaluate.yaml'  # beside the training run's, which stays as it was
        with open(self.path(name), 'w') as f:
            YAML(typ='safe').dump(self.config, f)


def setup(args, task):
    """The Run of this process, from the flags and the config checked against the task's record
    (tasks.py)."""
    config = configuration.load_config(args.config, task, getattr(args, 'text_encoder', None))
    if str(args.device).startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError('--device cuda: CUDA is not available on this machine (use --device cpu)')
    rank, world_size, local_rank = utils.init_distributed(args.device, args.dist_url, args.distributed)
    device = torch.device(f'cuda:{local_rank}' if str(args.device) == 'cuda' else args.device)
    seed = args.seed + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        # TF32 tensor cores for float32 matrix products in training (Ampere and newer; ignored
        # elsewhere); evaluation turns them off again unless --eval_amp (Run.eval_precision)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config, backends = effective_config(args, config, device)
    replaces = check_output_dir(args)
    set_threads(args, config)
    run = Run(args=args, config=config, rank=rank, world_size=world_size, device=device,
              output_dir=args.output_dir, tokenizer=build_tokenizer(config), amp=config['amp'],
              accum_steps=config['accum_steps'], replaces=replaces,
              scaler=torch.amp.GradScaler(device.type, enabled=config['amp'] == 'fp16'))
    run.writer = tracking.ScalarWriter(run.output_dir, backends, config, enabled=run.is_main)
    if run.distributed:
        # every process says where it runs
        print(f'process {run.rank} of {run.world_size} on {device} ({dist.get_backend()})')
    else:
        utils.print0(f'single process on {device}')
    return run


# ---- --overwrite ---------------------------------------------------------------------------------
def check_output_dir(args):
    """configuration.check_output_dir (refuses an output_dir with checkpoints unless --resume,
    --overwrite or --evaluate), saying what --overwrite replaces; returns those file names."""
    replaced = configuration.check_output_dir(args)
    if replaced:
        utils.print0(f"--overwrite: this run replaces {', '.join(replaced)} in {args.output_dir} "
                     f"(removed when it writes its first file)")
    return replaced


def remove_replaced(output_dir, names):
    """--overwrite: remove the earlier run's files that `check_output_dir` named, and say which."""
    removed = []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, name))
            removed.append(name)
    if removed:
        print(f"--overwrite: removed {', '.join(removed)} from {output_dir}", flush=True)
    return removed


def default_threads(num_workers, cores=None, local_processes=None, load=None):
    """Intra-op threads for one process: the cores this process may run on (its affinity mask),
    shared among the processes started on the node, less one core per data-loader worker, and no
    more than the node's idle cores allow (its cores less the 1-minute load average, shared among
    the local processes): on a busy machine, more threads than free cores make every step many
    times slower (benchmarks/threads.py)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    if local_processes is None:
        local_processes = dataset.loaders.local_processes()
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0.0
    local_processes = max(local_processes, 1)
    idle = (os.cpu_count() or cores) - round(load)
    return max(1, min(cores // local_processes - num_workers, idle // local_processes))


def set_threads(args, config):
    """The effective config's num_threads (--num_threads, else the key: checked by
    effective_config), else OMP_NUM_THREADS when set, else default_threads(). (DataLoader workers
    run one thread each.)"""
    threads = config.get('num_threads')
    if threads is None and os.environ.get('OMP_NUM_THREADS'):
        return torch.get_num_threads()
    threads = threads or default_threads(config.get('num_workers', 4))
    torch.set_num_threads(threads)
    return threads
