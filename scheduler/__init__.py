"""Learning-rate schedule: timm's cosine scheduler, configured as the original
(docs/DESIGN.md, "Learning-rate schedule").

The scripts drive it per "epoch" number t: during epoch 0 they call step(i // 100) after every
100th iteration (a linear warm-up over the first warmup_epochs x 100 iterations), and from then on
epoch e runs at step(e + warmup_epochs), the cosine position e.
"""
from timm.scheduler import CosineLRScheduler


def _get(args, key):
    return args[key] if isinstance(args, dict) else getattr(args, key)


def create_scheduler(args, optimizer):
    """`args` is the config's `schedular` section. Returns (scheduler, number of epochs)."""
    if _get(args, 'sched') != 'cosine':
        raise ValueError(f"schedular.sched: only 'cosine' is supported, got {_get(args, 'sched')!r}")
    epochs = _get(args, 'epochs')
    lr_scheduler = CosineLRScheduler(
        optimizer, t_initial=epochs, lr_min=_get(args, 'min_lr'), cycle_decay=_get(args, 'decay_rate'),
        warmup_lr_init=_get(args, 'warmup_lr'), warmup_t=_get(args, 'warmup_epochs'), warmup_prefix=True,
        cycle_limit=1, t_in_epochs=True, noise_range_t=None)
    return lr_scheduler, epochs + _get(args, 'cooldown_epochs')
