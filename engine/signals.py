"""SIGINT (Ctrl-C) and SIGTERM (SLURM pre-emption, `kill`) during training: remembered, and acted
on between optimizer steps, on every rank at the same step (`SIGNALS`)."""
import os
import signal

import torch
import torch.distributed as dist


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training; `code` is the exit status (128 + the signal number)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class StopSignals:
    """SIGINT and SIGTERM while `fit` trains are remembered instead of stopping the process
    mid-step: the loop asks `requested(run)` between optimizer steps, which every rank answers the
    same (the signal any rank received), so all ranks stop together at the same step. A second
    signal is taken as the same request (torchrun passes a Ctrl-C on to its workers, which had it
    already); before training, and at a third signal, SIGINT stops at once (KeyboardInterrupt) and
    SIGTERM ends the process as usual. `launch` installs the handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.count, self.active, self.previous, self.group = 0, 0, False, {}, None
        self.pending = None  # (work, flag) of the all-reduce in flight (see requested)

    def _handle(self, signum, frame):
        self.count += 1
        if not self.active or self.count > 2:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = self.signum or signum

    def install(self):
        self.signum, self.count, self.active, self.pending = 0, 0, False, None
        try:
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: the handlers stay as they are
            self.previous = {}

    def uninstall(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous, self.active, self.group, self.pending = {}, False, None, None

    def start(self, run):
        """Training begins: defer signals from now on (only where `launch` installed the handlers)."""
        if not self.previous:
            return
        if run.distributed and self.group is None:
            # a CPU group for the flag, so asking every step needs no device synchronisation
            self.group = dist.new_group(backend='gloo') if dist.get_backend() != 'gloo' else dist.group.WORLD
        self.active = True

    def requested(self, run, pipelined=False):
        """The signal number to stop for (0: go on), the same on every rank.

        With several processes the ranks agree over an all-reduce on a CPU group. `pipelined` (the
        loop's check after every optimizer step): the answer is that of the all-reduce the
        previous check started, which gloo finished in the background during the step (DDP keeps
        the ranks within a step of each other), and a new one starts for the next check, so the
        host never waits at a barrier for the flag; a signal is acted on one step later. Without
        it (between epochs) the check waits for the ranks' answer now. Every rank must make the
        same calls, in the same order.
        """
        if not self.active:
            return 0
        if not run.distributed:
            return self.signum
        answer = self._collect()
        if answer:
            return answer
        flag = torch.tensor([self.signum], dtype=torch.int64)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self.pending = work, flag
        return 0 if pipelined else self._collect()

    def _collect(self):
        """The result of the all-reduce in flight (0 if none), waiting for it if need be."""
        if self.pending is None:
            return 0
        (work, flag), self.pending = self.pending, None
        work.wait()
        return int(flag.item())  # a CPU tensor: no device synchronisation


SIGNALS = StopSignals()


def stop(signum, epoch, step, what):
    """End training after a signal: exit status 128 + the signal number (130 SIGINT, 143 SIGTERM)."""
    raise Interrupted(f'interrupted at epoch {epoch}, step {step}; {what}; continue with --resume', 128 + signum)
