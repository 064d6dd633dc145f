"""The training loop of every script: `fit` runs the epochs (train, evaluate, checkpoint, log one
JSON line), `train_one_epoch` the steps (the loss, gradient accumulation, the schedule's warm-up,
mid-epoch checkpoints, stopping at a signal or a non-finite loss)."""
import contextlib
import hashlib
import json
import os

import torch
import torch.distributed as dist

import tracking
import utils
from .build import make_optimizer_step
from .signals import SIGNALS, stop


class NonFiniteLossError(FloatingPointError):
    pass


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


def _since(checkpointer):
    name = os.path.basename(checkpointer.last_saved) if checkpointer and checkpointer.last_saved else None
    return f'nothing trained since {name}' if name else 'nothing was trained, so no checkpoint was written'


def train_one_epoch(model, loader, optimizer, lr_scheduler, epoch, run, state, train_step, checkpointer=None,
                    alpha_ramp=True, digits=3, optimizer_step=None):
    """One epoch: `train_step(model, batch, alpha, update_momentum)` returns a dict of named losses,
    which are summed, back-propagated and logged (`update_momentum`: whether the model's momentum
    encoders move in this forward; with gradient accumulation, on the first micro-batch of each
    optimizer step only). The bad images skipped are the loader's count (`loader.skipped`, None
    where it counts none), read at checkpoints and at the epoch's end. Owns the alpha ramp of epoch
    0, the non-finite-loss stop and mid-epoch checkpoints, and steps the schedule's warm-up
    (`lr_scheduler.step_iteration`).
    Returns the epoch averages as numbers: the losses rounded to `digits` decimals (the precision
    the original prints), the lr to `digits` significant digits."""
    config = run.config
    model.train()
    logger = utils.MetricLogger(delimiter='  ')
    logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    if state.step and state.meters:
        logger.load_state_dict(state.meters)
    loader.sampler.set_epoch(epoch, start=state.step * loader.batch_size)
    num_steps = len(loader)
    save_every = config.get('save_every_steps') or 0
    print_freq = config.get('print_freq', 50)
    guard = LossGuard()
    skipped_before = state.extra.get('skipped_images', 0) if state.step else 0  # before a resume, this epoch
    saved_step = state.step  # the step the newest checkpoint continues from

    def loader_skipped():
        return getattr(loader, 'skipped', None)

    def save_position():
        guard.check()
        state.meters, state.extra['skipped_images'] = logger.state_dict(), skipped_before + (loader_skipped() or 0)
        checkpointer.save('checkpoint_last.pth', state)
        return state.step

    accum = run.accum_steps
    # clipping (grad_clip_norm), the step and the loss scale; compiled under --compile step
    optimizer_step = optimizer_step or make_optimizer_step(optimizer, run)

    # the step line's numbers also go to TensorBoard / W&B, at the global step (the same after a resume)
    def to_writer(i, numbers):
        run.writer.step(epoch * num_steps + i, numbers)

    on_log = to_writer if run.writer is not None and run.writer.active else None
    for i, batch in logger.log_every(loader, print_freq, f'Train Epoch: [{epoch}]', start=state.step,
                                                    total=num_steps, on_log=on_log,
                                                    samples_per_step=loader.batch_size * run.world_size):
        alpha = config.get('alpha', 0)
        if epoch == 0 and alpha_ramp:
            alpha = alpha * min(1, i / num_steps)
        if config.get('compile'):  # a tensor: a new value each step is new data, not a new graph
            alpha = torch.tensor(alpha, dtype=torch.float32)
        # accumulation: the momentum encoders move once per optimizer step (on its first micro-batch)
        # and the gradients are all-reduced only on its last
        last_micro = (i + 1) % accum == 0 or i + 1 == num_steps
        sync = contextlib.nullcontext() if last_micro or not run.distributed else model.no_sync()
        with sync:
            with run.autocast():
                losses = train_step(model, batch, alpha, update_momentum=i % accum == 0)
                loss = sum(losses.values())
            run.scaler.scale(loss / accum if accum > 1 else loss).backward()
        if last_micro:
            optimizer_step()
            optimizer.zero_grad(set_to_none=True)
        guard.update(loss, epoch, i)
        lr = optimizer.param_groups[0]['lr']  # a tensor under --compile step, filled in place: copied
        logger.update(lr=lr.clone() if torch.is_tensor(lr) else lr, **{k: v.detach() for k, v in losses.items()})
        lr_scheduler.step_iteration(epoch, i)
        state.step = i + 1
        if i % print_freq == 0:
            guard.check()
        if checkpointer and save_every and state.step % save_every == 0 and state.step % accum == 0 \
                and state.step < num_steps:
            saved_step = save_position()
        # a signal stops between optimizer steps; at the epoch's last step the epoch is finished first
        if SIGNALS.active and state.step % accum == 0 and state.step < num_steps \
                and (signum := SIGNALS.requested(run, pipelined=True)):
            if checkpointer and state.step > saved_step:
                saved_step = save_position()
            written = checkpointer and checkpointer.last_saved == checkpointer.path('checkpoint_last.pth') \
                and saved_step == state.step
            stop(signum, epoch, state.step, 'checkpoint_last.pth written' if written else _since(checkpointer))
    guard.check()
    logger.synchronize_between_processes()
    utils.print0('Averaged stats:', logger.global_avg())
    state.step, state.meters = 0, None
    stats = {name: float(f'{meter.global_avg:.{digits}g}') if name == 'lr' else round(meter.global_avg, digits)
             for name, meter in logger.meters.items()}
    if loader_skipped() is not None:  # the loader counts skips (skip_bad_images; shards always do)
        count = torch.tensor(skipped_before + loader_skipped(), device=run.device)  # on the GPU under NCCL
        stats['skipped_images'] = int(utils.all_reduce_sum(count).item())
    if hasattr(loader, 'epoch_counts'):  # a stream's loader counts what the epoch trained (a collective)
        stats.update(loader.epoch_counts())
    return stats


def fit(run, training, loader, train_step, evaluate=None, best_key=None, evaluate_only=False, alpha_ramp=True,
        digits=3):
    """The epoch loop of every script: train one epoch, evaluate, log one JSON line, step the
    schedule, checkpoint. `training` is what `engine.prepare` returns; `train_step(model, batch,
    alpha, run, update_momentum)` returns the step's named losses (see `train_one_epoch`).

    With `evaluate(epoch) -> {name: value}` (fine-tuning) the evaluation runs after every epoch,
    `checkpoint_best.pth` keeps the epoch with the highest `best_key`, `checkpoint_last.pth` the
    newest, and log.txt ends with 'best epoch: N'. Without it (pre-training, VQA) every epoch
    is kept as `checkpoint_NN.pth`. `evaluate_only` evaluates once and writes only the log.
    `digits`: the rounding of the training averages (see `train_one_epoch`).
    """
    state, checkpointer = training.state, training.checkpointer
    epochs = run.config['schedular']['epochs']
    utils.print0('Start evaluation' if evaluate_only else 'Start training')
    SIGNALS.start(run)
    for epoch in range(state.epoch, epochs):
        state.epoch = epoch
        stats = {}
        if not evaluate_only:
            train_stats = train_one_epoch(training.model, loader, training.optimizer, training.lr_scheduler, epoch,
                                          run, state,
                                          lambda m, b, a, update_momentum: train_step(m, b, a, run, update_momentum),
                                          checkpointer, alpha_ramp=alpha_ramp, digits=digits,
                                          optimizer_step=training.optimizer_step)
            stats.update({f'train_{k}': v for k, v in train_stats.items()})
        if evaluate is not None:
            with run.eval_precision():
                stats.update(evaluate(epoch))
        if evaluate_only:
            log_stats(run, {**stats, 'epoch': epoch})
            return stats
        training.lr_scheduler.step_epoch(epoch)
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
        if epoch + 1 < epochs and (signum := SIGNALS.requested(run)):
            stop(signum, epoch + 1, 0, f'{os.path.basename(checkpointer.last_saved)} written')
    if evaluate is not None and run.is_main and state.best_epoch is not None:
        with open(run.path('log.txt'), 'a') as f:
            f.write(f'best epoch: {state.best_epoch}\n')
    check_replicas(training.module, run)
    SIGNALS.active = False  # what the script does after training stops at a signal as before
    return None


def check_replicas(model, run):
    """With several processes: every process's final weights hash to the same value (they would
    differ after a data-loading or synchronisation bug); rank 0 prints the hashes."""
    if not run.distributed:
        return
    digest = hashlib.sha256()
    for name, tensor in getattr(model, 'module', model).state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    hashes = [None] * run.world_size
    dist.all_gather_object(hashes, digest.hexdigest()[:16])
    utils.print0(f'final weights sha256 on each process: {" ".join(hashes)}')
    if len(set(hashes)) > 1:
        raise RuntimeError(f'the processes finished with different weights: {hashes}')


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
        run.start_output()
        with open(run.path('log.txt'), 'a') as f:
            f.write(json.dumps(numbers) + '\n')
        if run.writer is not None:
            run.writer.epoch(numbers)
