"""The training side of checkpoints (models/checkpoint.py reads, converts and loads them):
`Checkpointer` writes a run's checkpoints atomically (a full disk is a `DiskFullError` naming the
last good one), keeps the newest N epoch files, finds the checkpoint in an output_dir that is
furthest along, and resumes from it exactly: weights, optimizer, schedule, position, meters, the
fp16 scaler and every generator's state (`TrainState`, `rng_state`). `resume(run, checkpointer,
model)` is what `--resume` runs: the same frozen towers as the run it continues, and one line
naming the differing config keys when its model does not fit the checkpoint."""
import contextlib
import errno
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

import utils
from configuration import ConfigError, one_line
from models.checkpoint import CheckpointError
from models.freeze import FREEZE_KEYS

@dataclass
class TrainState:
    """Where training stands: the next iteration is `step` of `epoch`."""
    epoch: int = 0
    step: int = 0
    meters: dict = None
    best: float = None
    best_epoch: int = None
    extra: dict = field(default_factory=dict)


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of space (the message names the last good one)."""


def rng_state():
    """Every random generator's state (python, numpy, torch, CUDA), loadable with weights_only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {'python': random.getstate(), 'numpy': numpy_state, 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
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
    """Saves and restores everything a run needs to continue exactly where it stopped, in
    `output_dir`: {'model', 'optimizer', 'lr_scheduler', 'config', 'epoch'} (the original's format)
    plus a 'resume' entry (position, meters, best epoch, every rank's RNG states, the fp16 scaler).

    With several processes every rank calls `save` (the RNG states and meters are gathered) and rank
    0 writes; `before_write` runs on rank 0 before each file (`engine.prepare` passes
    `Run.start_output`: the first time, --overwrite's removals and config.yaml).
    """

    def __init__(self, output_dir, model, optimizer, lr_scheduler, config, scaler=None, rank=0, world_size=1,
                 before_write=None):
        self.output_dir, self.model, self.optimizer, self.lr_scheduler = output_dir, model, optimizer, lr_scheduler
        self.config, self.scaler, self.rank, self.world_size = config, scaler, rank, world_size
        self.before_write = before_write
        self.last_saved = None  # the newest checkpoint file this run wrote or resumed from

    def path(self, name):
        return os.path.join(self.output_dir, name)

    def save(self, filename, state, epoch=None):
        rng = rng_state()
        if self.world_size > 1:  # every rank's RNG states and meters (the epoch averages sum them)
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, (rng, state.meters))
            rng, meters = [g[0] for g in gathered], [g[1] for g in gathered]
        else:
            rng, meters = [rng], [state.meters]
        error = None
        if self.rank == 0:
            if self.before_write is not None:
                self.before_write()
            os.makedirs(self.output_dir, exist_ok=True)
            try:
                self._write(filename, state, epoch, rng, meters)
            except DiskFullError as e:
                last = self.last_saved or 'none (no checkpoint was written)'
                error = f'{e.strerror}; the last good checkpoint is {last}'
        if self.world_size > 1:  # every rank learns whether rank 0 could write (and waits for it)
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise DiskFullError(errno.ENOSPC, error)
        self.last_saved = self.path(filename)

    def _write(self, filename, state, epoch, rng, meters):
        scaler = self.scaler.state_dict() if self.scaler is not None and self.scaler.is_enabled() else None
        atomic_save({
            'model': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'lr_scheduler': self.lr_scheduler.state_dict(),
            'config': self.config,
            'epoch': state.epoch if epoch is None else epoch,
            'resume': {'epoch': state.epoch, 'step': state.step, 'meters': state.meters, 'best': state.best,
                       'best_epoch': state.best_epoch, 'extra': state.extra, 'rng': rng, 'rank_meters': meters,
                       'scaler': scaler},
        }, self.path(filename))

    def prune(self, keep):
        """Keep the newest `keep` epoch checkpoints (checkpoint_NN.pth); None keeps all."""
        if keep is None or self.rank != 0:
            return
        names = sorted(n for n in os.listdir(self.output_dir)
                       if n.startswith('checkpoint_') and n.endswith('.pth') and n[11:-4].isdigit())
        for name in names[:-keep]:
            os.remove(self.path(name))

    def newest(self):
        """(path, checkpoint) of the checkpoint in output_dir that is furthest along, or None.

        Each candidate is opened memory-mapped with the restricted unpickler (`weights_only`):
        only its small 'resume' entry is read from disk, not the weights of a multi-GB file, and
        the chosen one's tensors are read when they are used."""
        best, best_position = None, None
        if not os.path.isdir(self.output_dir):
            return None
        for name in sorted(os.listdir(self.output_dir)):
            if not (name.startswith('checkpoint') and name.endswith('.pth')):
                continue
            path = self.path(name)
            try:
                ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            except Exception as e:
                utils.print0(f'skipping unreadable {path}: {one_line(e)}')
                continue
            if not isinstance(ckpt, dict):
                utils.print0(f'skipping {path}: not a training checkpoint')
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
            raise CheckpointError(f'--resume: no checkpoint to resume from in {self.output_dir}')
        path, ckpt = found
        self.model.load_state_dict(ckpt['model'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        self.lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
        resume = ckpt.get('resume') or {'epoch': ckpt['epoch'] + 1, 'step': 0}
        meters = resume.get('rank_meters')
        meters = meters[self.rank] if meters and len(meters) == self.world_size else resume.get('meters')
        state = TrainState(epoch=resume['epoch'], step=resume['step'], meters=meters,
                           best=resume.get('best'), best_epoch=resume.get('best_epoch'),
                           extra=resume.get('extra') or {})
        if resume.get('scaler') and self.scaler is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(resume['scaler'])
        rng = resume.get('rng')
        if rng and len(rng) == self.world_size:
            set_rng_state(rng[self.rank])
        elif rng:
            utils.print0(f'resuming with {self.world_size} processes from a run with {len(rng)}: '
                  f'random streams are not continued')
        self.last_saved = path
        utils.print0(f'resumed from {path} at epoch {state.epoch}, step {state.step}')
        return state


# ---- --resume ------------------------------------------------------------------------------------
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
    """--resume: checkpointer.resume() after `check_same_frozen`; returns the TrainState. A
    checkpoint whose weights do not fit the config's model ends in one line naming the checkpoint,
    the config and the first differing keys (not torch's list of every missing and unexpected
    tensor)."""
    check_same_frozen(checkpointer, run.config)
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
