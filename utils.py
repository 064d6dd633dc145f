"""Distributed helpers, metric logging and small utilities shared by the models and the scripts.

Every distributed helper is safe without a process group: with one process the gathers return
their input, barriers do nothing, the world size is 1 and the rank is 0.
"""
import datetime
import os
import sys
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist


# ---- distributed --------------------------------------------------------------------------------
def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def print0(*args, **kwargs):
    """print() on the first process only (on the one process without a process group): what a run
    reports is said once. Errors are said by every process that meets one (engine.launch.say)."""
    if is_main_process():
        print(*args, **kwargs)


def barrier():
    """`torch.distributed.barrier()` when a process group exists, else nothing."""
    if is_dist_avail_and_initialized():
        dist.barrier()


@torch.no_grad()
def concat_all_gather(tensor):
    """All-gather `tensor` from every rank and concatenate on dim 0 in rank order (no gradient)."""
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def gather_rows(tensor, total, strided=False):
    """The `total` rows of a tensor split over ranks by rows, on every rank, in one all-gather.

    strided: rank r holds rows r, r + world, r + 2 world, ... (dataset.loaders.eval_loader's split);
    otherwise contiguous blocks of total // world + 1 rows (models.retrieval_eval.rank_rows).
    Shares of unequal length are padded for the collective and the padding is dropped.
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    rows = -(-total // world_size) if strided else total // world_size + 1
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[:tensor.size(0)] = tensor
    gathered = tensor.new_empty((world_size, rows, *tensor.shape[1:]))
    if dist.get_backend() == 'nccl':
        dist.all_gather_into_tensor(gathered, padded)
    else:  # gloo: into the slices of `gathered` (contiguous views)
        dist.all_gather(list(gathered.unbind(0)), padded)
    if strided:  # row j of rank r is row j * world + r
        gathered = gathered.transpose(0, 1)
    return gathered.reshape(world_size * rows, *tensor.shape[1:])[:total]


def all_reduce_sum(tensor):
    """Sum over ranks, in place; the identity with one process."""
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor)
    return tensor


def launcher_env():
    """(rank, world_size, local_rank) from torchrun / `launch --use_env` / SLURM, or None."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        return int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ.get('LOCAL_RANK', 0))
    if 'SLURM_PROCID' in os.environ and int(os.environ.get('SLURM_NTASKS', 1)) > 1:
        rank = int(os.environ['SLURM_PROCID'])
        local_rank = int(os.environ.get('SLURM_LOCALID', rank % max(torch.cuda.device_count(), 1)))
        return rank, int(os.environ['SLURM_NTASKS']), local_rank
    return None


def init_distributed(device='cpu', dist_url='env://', enabled=True):
    """(rank, world_size, local_rank): when a launcher started several processes (and `enabled`),
    join the process group (gloo for a CPU `device`, NCCL for CUDA, on the local rank's GPU); else
    (0, 1, 0). What a run reports goes through `print0`, which prints on the first process only."""
    env = launcher_env() if enabled else None
    if env is None:
        return 0, 1, 0
    rank, world_size, local_rank = env
    use_cuda = str(device).startswith('cuda')
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if 'SLURM_PROCID' in os.environ and 'MASTER_ADDR' not in os.environ and dist_url == 'env://':
        raise RuntimeError('SLURM launch: set MASTER_ADDR and MASTER_PORT (or pass --dist_url tcp://HOST:PORT)')
    dist.init_process_group(backend='nccl' if use_cuda else 'gloo', init_method=dist_url,
                            world_size=world_size, rank=rank)
    barrier()
    return rank, world_size, local_rank


# ---- moving batches to the device ---------------------------------------------------------------
def to_device(obj, device):
    """`obj` (a tensor, or a dict / list / tuple of them, e.g. the tokenizer's output) on `device`,
    copied without making the host wait.

    A copy to a GPU with non_blocking=True is asynchronous only from pinned (page-locked) memory:
    from ordinary memory the host waits for the GPU's queue to drain before it copies. CPU tensors
    are therefore pinned first (a host-side copy) unless the loader pinned them already. The
    source is never modified afterwards: the pinned copy is a new tensor, and its memory is not
    reused before the transfer has finished (the pinned allocator records the copy). On the CPU this
    returns `obj` itself.
    """
    device = torch.device(device)
    if torch.is_tensor(obj):
        if obj.device == device or (device.index is None and obj.device.type == device.type):
            return obj
        if device.type == 'cuda' and obj.device.type == 'cpu' and not obj.is_pinned():
            obj = obj.pin_memory()
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return type(obj)({key: to_device(value, device) for key, value in obj.items()})
    if isinstance(obj, (list, tuple)) and not isinstance(obj, str):
        moved = [to_device(value, device) for value in obj]
        return type(obj)(moved) if isinstance(obj, list) or type(obj) is tuple else type(obj)(*moved)
    return obj


# ---- metric logging -----------------------------------------------------------------------------
def _to_float(value):
    return value.item() if torch.is_tensor(value) else float(value)


class SmoothedValue:
    """A window of recent values plus the running total. Tensor values stay on their device until
    a statistic is read, so logging does not synchronise the host with the GPU every step."""

    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or '{median:.4f} ({global_avg:.4f})'

    def update(self, value, n=1):
        if torch.is_tensor(value):
            value = value.detach()
        self.deque.append(value)
        self.count += n
        self.total = self.total + value * n

    def _values(self):
        return torch.tensor([_to_float(v) for v in self.deque])

    def synchronize_between_processes(self):
        """Sum count and total over ranks (the window is not synchronised)."""
        if not is_dist_avail_and_initialized():
            return
        device = 'cuda' if dist.get_backend() == 'nccl' else 'cpu'
        t = torch.tensor([self.count, _to_float(self.total)], dtype=torch.float64, device=device)
        barrier()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        return self._values().median().item()

    @property
    def avg(self):
        return self._values().float().mean().item()

    @property
    def global_avg(self):
        return _to_float(self.total) / self.count

    @property
    def max(self):
        return max(_to_float(v) for v in self.deque)

    @property
    def value(self):
        return _to_float(self.deque[-1])

    def state_dict(self):
        return {'deque': [_to_float(v) for v in self.deque], 'total': _to_float(self.total), 'count': self.count,
                'window_size': self.deque.maxlen, 'fmt': self.fmt}

    def load_state_dict(self, state):
        self.deque = deque(state['deque'], maxlen=state['window_size'])
        self.total, self.count, self.fmt = state['total'], state['count'], state['fmt']

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    def __init__(self, delimiter='\t'):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if not torch.is_tensor(value) and not isinstance(value, (float, int)):
                raise TypeError(f'meter {name!r}: expected a number or a tensor, got {type(value).__name__}')
            self.meters[name].update(value)

    def __getattr__(self, attr):
        if attr in self.__dict__.get('meters', {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def global_avg(self):
        return self.delimiter.join(f'{name}: {meter.global_avg:.4f}' for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def state_dict(self):
        return {name: meter.state_dict() for name, meter in self.meters.items()}

    def load_state_dict(self, state):
        for name, meter_state in state.items():
            meter = SmoothedValue()
            meter.load_state_dict(meter_state)
            self.meters[name] = meter

    def log_every(self, iterable, print_freq, header='', start=0, samples_per_step=None, total=None,
                  on_log=None):
        """Yield (i, item) for i = start, start + 1, ...; every `print_freq` steps and at the last,
        print the meters, the time per step, samples per second and the time remaining.

        `on_log(i, {name: number})`, when given, receives the printed numbers at the same steps:
        each meter's median (the first number its column shows; the lr meter's window is one step,
        so its median is the value), 'time' and 'data_time' (seconds per step, averaged over the
        last 20), 'samples_per_s' and, on GPUs, 'max_mem_mb' (peak CUDA memory in MiB)."""
        total = len(iterable) if total is None else total
        width = len(str(total))
        start_time = end = time.time()
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        i = start
        for obj in iterable:
            data_time.update(time.time() - end)
            yield i, obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [header, f'[{i:{width}d}/{total}]', f'eta: {eta}', str(self), f'time: {iter_time}',
                         f'data: {data_time}']
                numbers = {'time': iter_time.avg, 'data_time': data_time.avg}
                if samples_per_step:
                    numbers['samples_per_s'] = samples_per_step / max(iter_time.avg, 1e-9)
                    parts.append(f"samples/s: {numbers['samples_per_s']:.1f}")
                if torch.cuda.is_available():
                    numbers['max_mem_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
                    parts.append(f"max mem: {numbers['max_mem_mb']:.0f}MB")
                print0(self.delimiter.join(p for p in parts if p), flush=True)
                if on_log is not None:
                    on_log(i, {**{name: meter.median for name, meter in self.meters.items()}, **numbers})
            i += 1
            end = time.time()
        steps = max(i - start, 1)
        total_time = time.time() - start_time
        print0(f'{header} Total time: {datetime.timedelta(seconds=int(total_time))} '
              f'({total_time / steps:.4f} s / it)', flush=True)


# ---- progress -----------------------------------------------------------------------------------
def progress(iterable=None, *, total=None, desc='', unit='it', leave=True, disable=False):
    """A tqdm bar on a terminal; on a file or a pipe (a log) plain lines instead of the bar's
    carriage-return frames (`Progress`). Iterate over it, or call `update(n)` and `close()`."""
    if not disable and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return Progress(iterable, total=total, desc=desc, unit=unit, quiet=disable)


class Progress:
    """Progress written as lines to stderr: one each time another tenth of `total` is done (with no
    total: each `every` seconds), never two within `every` seconds, and a last one at the end if any
    was written. A loop of under `every` seconds writes nothing."""

    def __init__(self, iterable=None, total=None, desc='', unit='it', quiet=False, every=10.0):
        if total is None and hasattr(iterable, '__len__'):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit, self.quiet, self.every = \
            iterable, total, desc, unit, quiet, every
        self.n = self.shown = 0
        self.start = self.last = time.monotonic()
        self.wrote = self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        step = self.total / 10 if self.total else None
        if now - self.last >= self.every and (step is None or self.n - self.shown >= step):
            self._write(now)

    def _write(self, now):
        if self.quiet:
            return
        done = f'{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)' if self.total \
            else f'{self.n} {self.unit}'
        sys.stderr.write(f'{self.desc}: {done}, {datetime.timedelta(seconds=int(now - self.start))}\n')
        sys.stderr.flush()
        self.shown, self.last, self.wrote = self.n, now, True

    def close(self):
        if not self.closed:
            self.closed = True
            if self.wrote and self.n != self.shown:
                self._write(time.monotonic())


def significant(value, digits=6):
    """A float to `digits` significant digits (72.39999999999999 -> 72.4); anything else as it is."""
    return float(f'{value:.{digits}g}') if isinstance(value, float) else value

