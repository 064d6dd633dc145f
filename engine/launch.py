"""The entry point of every script: parse the flags, run `main(args)`, and end bad input with one
line on stderr and exit status 2 (a signal: 128 + its number), closing the loader workers, the
trackers and the process group whatever happened, so that no run outlives its end."""
import sys

import torch.distributed as dist

import dataset.loaders
import tracking
import utils
from configuration import ConfigError, one_line
from models.checkpoint import CheckpointError
from .checkpointing import DiskFullError
from .loop import NonFiniteLossError
from .signals import SIGNALS, Interrupted

# what gloo and NCCL say when another process of the group is gone
PEER_LOST = ('Connection closed by peer', 'Connection reset by peer', 'Broken pipe', 'remote process exited')


def launch(main, parser, argv=None):
    """Parse arguments and run `main(args)`; bad input ends with a one-line error and exit status 2."""
    from dataset import DataError
    args = parser.parse_args(argv)
    SIGNALS.install()
    try:
        main(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, NonFiniteLossError, DiskFullError) as error:
        message = error.strerror if isinstance(error, DiskFullError) else one_line(error)
        # every process reads the same config, checkpoint and weights, and the first speaks for all;
        # a data error in training is this process's own (its share of the data)
        if utils.is_main_process() or (SIGNALS.active and isinstance(error, DataError)):
            say(f'error: {message}')
        sys.exit(2)
    except Interrupted as interrupt:
        utils.print0(interrupt, file=sys.stderr, flush=True)
        sys.exit(interrupt.code)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        utils.print0('interrupted; nothing more was written (continue with --resume from the last checkpoint, if any)',
              file=sys.stderr, flush=True)
        sys.exit(130)
    except RuntimeError as error:
        lost = peer_lost(error) if utils.is_dist_avail_and_initialized() else None
        if lost is None:
            raise  # a bug: its traceback, exit status 1
        # the process that stopped first printed why; this one's traceback would only bury that
        say(f'error: process {utils.get_rank()} of {utils.get_world_size()} stops: another process of the run '
            f'stopped ({lost})')
        sys.exit(1)
    finally:  # whatever ended the run: nothing of it may keep this process alive
        SIGNALS.uninstall()
        dataset.loaders.shutdown_workers()
        tracking.close_all()
        if utils.is_dist_avail_and_initialized():
            dist.destroy_process_group()


def say(line):
    """A line on stderr from any process (utils.print0 prints on the first only)."""
    sys.stderr.write(line + '\n')
    sys.stderr.flush()


def peer_lost(error):
    """What gloo or NCCL said when a collective failed because another process of the group is
    gone, else None."""
    found = [text for text in PEER_LOST if text in str(error)]
    return found[0] if found else 'connection lost' if isinstance(error, dist.DistNetworkError) else None
