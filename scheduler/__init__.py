"""Learning-rate schedule: timm's cosine scheduler, configured as the original
(docs/DESIGN.md, "Learning-rate schedule"), with the original's warm-up stepping.

The schedule runs on a per-"epoch" number t. During epoch 0, `step_iteration(0, i)` steps it to
i // 100 after every 100th iteration (a linear warm-up over the first warmup_epochs x 100
iterations); at the end of epoch e, `step_epoch(e)` steps it to e + warmup_epochs + 1, so epoch e
runs at the cosine position e. The training loop calls these two and nothing else.
"""
import torch
from timm.scheduler import CosineLRScheduler

WARMUP_STEP_SIZE = 100  # the warm-up advances the schedule every 100 iterations of epoch 0


class WarmupCosineLRScheduler(CosineLRScheduler):
    """CosineLRScheduler (its state_dict unchanged: checkpoints of either load into the other)
    stepped the way the original scripts step it."""

    def step_iteration(self, epoch, i):
        """After iteration `i` of `epoch`: the warm-up's step every WARMUP_STEP_SIZE iterations of epoch 0."""
        if epoch == 0 and i % WARMUP_STEP_SIZE == 0 and i <= self.warmup_t * WARMUP_STEP_SIZE:
            self.step(i // WARMUP_STEP_SIZE)

    def step_epoch(self, epoch):
        """At the end of `epoch`: the position the next epoch trains at."""
        self.step(epoch + self.warmup_t + 1)

    def update_groups(self, values):
        """As timm's, except that an lr held as a tensor (a compiled optimizer step, --compile step) is
        filled in place: the compiled graph reads it as an input, so a new value is new data, not a
        new graph."""
        if not isinstance(values, (list, tuple)):
            values = [values] * len(self.optimizer.param_groups)
        for group, value in zip(self.optimizer.param_groups, values):
            value = value * group.get('lr_scale', 1.0)
            if isinstance(group[self.param_group_field], torch.Tensor):
                group[self.param_group_field].fill_(value)
            else:
                group[self.param_group_field] = value


def _get(args, key):
    return args[key] if isinstance(args, dict) else getattr(args, key)


def create_scheduler(args, optimizer):
    """`args` is the config's `schedular` section. Returns (scheduler, number of epochs)."""
    if _get(args, 'sched') != 'cosine':
        raise ValueError(f"schedular.sched: only 'cosine' is supported, got {_get(args, 'sched')!r}")
    epochs = _get(args, 'epochs')
    lr_scheduler = WarmupCosineLRScheduler(
        optimizer, t_initial=epochs, lr_min=_get(args, 'min_lr'), cycle_decay=_get(args, 'decay_rate'),
        warmup_lr_init=_get(args, 'warmup_lr'), warmup_t=_get(args, 'warmup_epochs'), warmup_prefix=True,
        cycle_limit=1, t_in_epochs=True, noise_range_t=None)
    return lr_scheduler, epochs + _get(args, 'cooldown_epochs')
