"""Ctrl-C and pre-emption (SIGINT, SIGTERM) during a run, in one process and in two: the run
stops between steps on every rank at once, writes checkpoint_last.pth where it stopped, says so in
one line and exits with 128 + the signal's number; --resume continues from there exactly.
The other faults a new user meets are in tests/test_faults.py."""
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

import engine.run
import Pretrain
from conftest import ROOT
from test_faults import run_pretrain


# ---- 6. interrupts and pre-emption ------------------------------------------------------------------
# 7 steps in each process (one epoch of the small demo world), a step line every 2 steps; the signal
# is sent once the line of step 2 is out, so it lands mid-epoch
SIGNAL_RUN = dict(queue_size=32, num_workers=0, print_freq=2, schedular={'epochs': 1})
TRIGGER = 'Train Epoch: [0]  [2/7]'


def start_pretrain(config, out, nproc, *flags):
    command = [sys.executable]
    if nproc > 1:
        command += ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    command += [os.path.join(ROOT, 'Pretrain.py'), '--config', str(config), '--output_dir', str(out),
                '--device', 'cpu', *flags]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


class Output:
    """Collects a process's stdout and stderr; `reached` is set once stdout shows TRIGGER."""

    def __init__(self, process):
        self.process, self.out, self.err, self.reached = process, [], [], threading.Event()
        self.threads = [threading.Thread(target=self._read, args=(process.stdout, self.out), daemon=True),
                        threading.Thread(target=self._read, args=(process.stderr, self.err), daemon=True)]
        for thread in self.threads:
            thread.start()

    def _read(self, stream, lines):
        for line in stream:
            lines.append(line)
            if TRIGGER in line:
                self.reached.set()

    def wait(self, timeout=300):
        code = self.process.wait(timeout)
        for thread in self.threads:
            thread.join(timeout)
        return code, ''.join(self.out), ''.join(self.err)


def worker_pids(launcher_pid):
    """{rank: pid} of the workers torchrun started."""
    pids = {}
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            ppid = int(open(f'/proc/{name}/stat').read().rsplit(')', 1)[1].split()[1])
            environ = open(f'/proc/{name}/environ', 'rb').read().split(b'\0')
        except OSError:
            continue
        if ppid == launcher_pid:
            env = dict(item.split(b'=', 1) for item in environ if b'=' in item)
            pids[int(env[b'RANK'])] = int(name)
    return pids


def interrupt(config, out, nproc, signum, target):
    """Start a run that gets `signum` mid-epoch, sent to `target` ('process': the launched process,
    'group': every process, as Ctrl-C in a terminal does, or a rank number). Returns its Output."""
    output = Output(start_pretrain(config, out, nproc))

    def send():
        assert output.reached.wait(300), 'the run did not reach step 2'
        if target == 'group':
            os.killpg(output.process.pid, signum)
        elif target == 'process':
            output.process.send_signal(signum)
        else:
            os.kill(worker_pids(output.process.pid)[target], signum)

    threading.Thread(target=send, daemon=True).start()
    return output


def assert_same_end(out, reference):
    checkpoint = torch.load(out / 'checkpoint_00.pth', map_location='cpu', weights_only=False)
    expected = torch.load(reference / 'checkpoint_00.pth', map_location='cpu', weights_only=False)
    for key, value in expected['model'].items():
        assert torch.equal(checkpoint['model'][key], value), key
    for index, values in expected['optimizer']['state'].items():
        for name, value in values.items():
            assert torch.equal(checkpoint['optimizer']['state'][index][name], value), (index, name)
    assert open(out / 'log.txt').read() == open(reference / 'log.txt').read()


@pytest.fixture
def default_threads(monkeypatch):
    """The scripts run in this process choose their thread count as without OMP_NUM_THREADS."""
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(os, 'getloadavg', lambda: (0.0, 0.0, 0.0))  # an idle machine: every core
    threads = torch.get_num_threads()
    yield engine.run.default_threads(num_workers=0)
    torch.set_num_threads(threads)


def test_signals_in_one_process(demo_config, tmp_path, capsys, monkeypatch, default_threads):
    # in this process, the signal sent by the third training step to the process itself: it
    # finishes that step, writes checkpoint_last.pth and stops; --resume ends as the uninterrupted
    # run, at the default thread count (every core here: the CPU kernels are deterministic at any
    # number of threads)
    config = demo_config('Pretrain', **SIGNAL_RUN, batch_size=8)
    reference = tmp_path / 'reference'
    assert run_pretrain(['--config', config, '--output_dir', reference]) == 0
    assert torch.get_num_threads() == default_threads
    train_step = Pretrain.train_step
    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        steps, out = [], tmp_path / signum.name

        def step_then_signal(model, batch, alpha, run, update_momentum=True):
            steps.append(len(steps))
            if len(steps) == 3:
                os.kill(os.getpid(), signum)
            return train_step(model, batch, alpha, run, update_momentum)

        monkeypatch.setattr(Pretrain, 'train_step', step_then_signal)
        capsys.readouterr()
        assert run_pretrain(['--config', config, '--output_dir', out]) == status
        assert capsys.readouterr().err.splitlines() == [
            'interrupted at epoch 0, step 3; checkpoint_last.pth written; continue with --resume']
        assert steps == [0, 1, 2]
        assert sorted(os.listdir(out)) == ['checkpoint_last.pth', 'config.yaml', 'tensorboard']
        monkeypatch.setattr(Pretrain, 'train_step', train_step)
        assert run_pretrain(['--config', config, '--output_dir', out, '--resume']) == 0
        assert f'resumed from {out / "checkpoint_last.pth"} at epoch 0, step 3' in capsys.readouterr().out
        assert_same_end(out, reference)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # launch put the handlers back


def test_signals_in_two_processes(demo_config, tmp_path):
    # torchrun with 2 processes of 30 items in batches of 4: 7 steps each
    nproc = 2
    config = demo_config('Pretrain', **SIGNAL_RUN, batch_size=4)
    reference, by_sigint, by_sigterm = tmp_path / 'reference', tmp_path / 'sigint', tmp_path / 'sigterm'
    uninterrupted = Output(start_pretrain(config, reference, nproc))
    # Ctrl-C to every process (as in a terminal), SIGTERM to rank 1 alone, which rank 0 must follow
    with_sigint = interrupt(config, by_sigint, nproc, signal.SIGINT, 'group')
    with_sigterm = interrupt(config, by_sigterm, nproc, signal.SIGTERM, 1)
    code, _, err = uninterrupted.wait()
    assert code == 0, err[-3000:]

    for out, output, status in ((by_sigint, with_sigint, 130), (by_sigterm, with_sigterm, 143)):
        code, stdout, err = output.wait()
        lines = [line for line in err.splitlines() if line.startswith('interrupted')]
        # no traceback from the project's code (torchrun itself reports the signal with one, from
        # its own files, which lie under ROOT too when the virtual environment is ROOT/.venv)
        venv = (f'File "{sys.prefix}{os.sep}', f'File "{os.path.realpath(sys.prefix)}{os.sep}')
        ours = [line for line in err.splitlines()
                if f'File "{ROOT}{os.sep}' in line and not any(v in line for v in venv)]
        assert len(lines) == 1 and not ours, err[-3000:]
        step = int(lines[0].split('step ')[1].split(';')[0])
        assert 2 < step < 7
        assert lines[0] == f'interrupted at epoch 0, step {step}; checkpoint_last.pth written; continue with --resume'
        assert code != 0  # torchrun's own status (it reports the workers' 130 / 143 as a failure)
        assert f'exitcode  : {status}' in err or 'got signal' in err, err[-3000:]
        assert sorted(os.listdir(out)) == ['checkpoint_last.pth', 'config.yaml', 'tensorboard']
        resume = torch.load(out / 'checkpoint_last.pth', map_location='cpu', weights_only=False)['resume']
        assert (resume['epoch'], resume['step'], len(resume['rng'])) == (0, step, nproc)

    resumed = [Output(start_pretrain(config, out, nproc, '--resume')) for out in (by_sigint, by_sigterm)]
    for out, output in zip((by_sigint, by_sigterm), resumed):
        code, stdout, err = output.wait()
        assert code == 0, err[-3000:]
        assert f'resumed from {out / "checkpoint_last.pth"} at epoch 0' in stdout
        assert_same_end(out, reference)
