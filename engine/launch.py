"""The entry point of every script: parse the flags, run `main(args)`, and end bad input with one
line on stderr and exit status 2 (a signal: 128 + its number), closing the trackers and the
process group whatever happened."""
import sys

import torch.distributed as dist

import tracking
import utils
from configuration import ConfigError
from models.checkpoint import CheckpointError, DiskFullError
from .loop import NonFiniteLossError
from .signals import SIGNALS, Interrupted


def launch(main, parser, argv=None):
    """Parse arguments and run `main(args)`; bad input ends with a one-line error and exit status 2."""
    from dataset import DataError
    args = parser.parse_args(argv)
    SIGNALS.install()
    try:
        main(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, NonFiniteLossError, DiskFullError) as error:
        message = error.strerror if isinstance(error, DiskFullError) else utils.short_message(error)
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
