"""Scalars for the dashboards people watch: TensorBoard and Weights & Biases.

`ScalarWriter` is the one place the training scripts send numbers to besides the step lines they
print and log.txt. Only rank 0 writes. Every `print_freq` steps it records what the step line
prints (each loss, the lr, time per step, data-loading time, samples/s and, on GPUs, the peak
CUDA memory) under `train/<name>` against the global step, `epoch * steps_per_epoch + step`, which
a resumed run continues where it stopped. After every epoch it records each number of the epoch's
log.txt line under `epoch/<key>` against the epoch.

TensorBoard files go to output_dir/tensorboard/ (`tensorboard --logdir output_dir`). W&B is
imported only when asked for; `WANDB_MODE=offline` writes the run under output_dir/wandb/ with no
network (`wandb sync` uploads it later). Nothing is opened before the first number arrives, so a
run that stops on bad input leaves output_dir as it was.
"""
import atexit
import importlib.util
import os

BACKENDS = ('tensorboard', 'wandb')
DEFAULT = 'tensorboard'

_open_writers = []


class LogToError(ValueError):
    """An unknown or unavailable `log_to` backend (engine reports it as a config error)."""


def parse_log_to(value, where='log_to'):
    """The backends named by `value`: 'tensorboard,wandb', ['tensorboard', 'wandb'], 'none',
    None or '' (the default, TensorBoard). Returns a tuple in BACKENDS order."""
    if value is None:
        value = DEFAULT
    if value is False:  # YAML `log_to: off` / `no` reads as a boolean
        value = 'none'
    names = value.split(',') if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise LogToError(f"{where}: expected a comma-separated list of {', '.join(BACKENDS)} or 'none', "
                         f'got {value!r}')
    names = [n.strip().lower() for n in names if n.strip()]
    if not names:
        names = [DEFAULT]
    for name in names:
        if name not in BACKENDS + ('none',):
            raise LogToError(f"{where}: unknown logger '{name}' (expected {', '.join(BACKENDS)} or none)")
    if 'none' in names and len(names) > 1:
        raise LogToError(f"{where}: 'none' cannot be combined with other loggers, got {value!r}")
    for name in BACKENDS:  # found here, imported only at the first number
        if name in names and importlib.util.find_spec(name) is None:
            raise LogToError(f'{where}: {name} is not installed (pip install {name}, or log to none)')
    return tuple(b for b in BACKENDS if b in names)


def as_number(value):
    """A finite or non-finite Python float/int for a scalar, or None for anything else."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    item = getattr(value, 'item', None)  # numpy and torch scalars
    if callable(item) and getattr(value, 'ndim', 0) == 0:
        value = item()
        return value if isinstance(value, (int, float)) else None
    return None


class ScalarWriter:
    """Rank 0's TensorBoard and/or W&B writer; a no-op when `backends` is empty or not `enabled`.

    Args:
        output_dir: the run's output_dir (TensorBoard writes to output_dir/tensorboard/).
        backends: a subset of BACKENDS, as `parse_log_to` returns it.
        config: the run's effective config (W&B stores it with the run).
        enabled: False on every rank but the first.
    """

    def __init__(self, output_dir, backends=(DEFAULT,), config=None, enabled=True):
        self.output_dir, self.config = output_dir, config
        self.backends = tuple(backends) if enabled else ()
        self._tensorboard = self._wandb = None
        self._opened = False

    @property
    def active(self):
        return bool(self.backends)

    @property
    def log_dir(self):
        return os.path.join(self.output_dir, 'tensorboard')

    def _open(self, first_step=None):
        if self._opened:
            return
        self._opened = True
        os.makedirs(self.output_dir, exist_ok=True)
        if 'tensorboard' in self.backends:
            from torch.utils.tensorboard import SummaryWriter
            # a run resumed at step T (or started afresh in an old output_dir) hides the events that an
            # interrupted run wrote at steps >= T, so each step keeps one point
            self._tensorboard = SummaryWriter(log_dir=self.log_dir, purge_step=first_step)
        if 'wandb' in self.backends:
            import wandb
            name = os.path.basename(os.path.normpath(self.output_dir))
            self._wandb = wandb.init(project=os.environ.get('WANDB_PROJECT', 'albef'), name=name,
                                     dir=self.output_dir, config=self.config)
            # two x axes: the global step for the step scalars, the epoch for the epoch lines
            self._wandb.define_metric('global_step')
            self._wandb.define_metric('train/*', step_metric='global_step')
            self._wandb.define_metric('epoch')
            self._wandb.define_metric('epoch/*', step_metric='epoch')
        _open_writers.append(self)

    def _write(self, prefix, step, axis, scalars):
        values = {}
        for name, value in scalars.items():
            number = as_number(value)
            if number is not None:
                values[f'{prefix}/{name}'] = number
        if not values:
            return
        self._open(first_step=step if prefix == 'train' else None)
        if self._tensorboard is not None:
            for tag, value in values.items():
                self._tensorboard.add_scalar(tag, value, global_step=step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log({**values, axis: step})

    def step(self, global_step, scalars):
        """The step line's numbers {name: value} as `train/<name>` at `global_step`."""
        if self.active:
            self._write('train', global_step, 'global_step', scalars)

    def epoch(self, stats):
        """An epoch's log.txt line as `epoch/<key>` at its 'epoch' (non-numbers are skipped)."""
        if self.active:
            epoch = stats['epoch']
            self._write('epoch', epoch, 'epoch', {k: v for k, v in stats.items() if k != 'epoch'})

    def close(self):
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self in _open_writers:
            _open_writers.remove(self)


def close_all():
    """Close every writer this process opened (the end of `engine.launch`, and at exit)."""
    for writer in list(_open_writers):
        writer.close()


atexit.register(close_all)
