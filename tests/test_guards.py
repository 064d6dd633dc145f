"""A non-finite loss stops training: within `print_freq` steps of the step that produced it, with one
line on stderr naming that step and exit status 2, and the last checkpoint written before it kept
(README.md, "Resume"). Pretrain.py runs in this process, as `python Pretrain.py ...` would."""
import os

import torch

import Pretrain
from test_faults import run_pretrain


def test_a_non_finite_loss_stops_the_run(demo_config, tmp_path, capsys, monkeypatch):
    # 7 steps of 8; checkpoint_last.pth every 2 steps; the loss checked every 2 steps
    config = demo_config('Pretrain', batch_size=8, queue_size=32, num_workers=0, print_freq=2, save_every_steps=2,
                         schedular={'epochs': 1})
    train_step, steps = Pretrain.train_step, []

    def nan_at_step_2(model, batch, alpha, run, update_momentum=True):
        losses = train_step(model, batch, alpha, run, update_momentum)
        steps.append(len(steps))
        if len(steps) == 3:
            losses['loss_itm'] = losses['loss_itm'] * float('nan')
        return losses

    monkeypatch.setattr(Pretrain, 'train_step', nan_at_step_2)
    out = tmp_path / 'out'
    assert run_pretrain(['--config', config, '--output_dir', out]) == 2
    assert capsys.readouterr().err.splitlines() == ['error: the loss became non-finite at epoch 0, step 2; stopping '
                                                    '(the last checkpoint written before it is kept)']
    assert steps == [0, 1, 2]  # stopped at the step's own check, not at the end of the epoch
    names = os.listdir(out)
    assert 'checkpoint_last.pth' in names and 'checkpoint_00.pth' not in names and 'log.txt' not in names, names
    # the checkpoint of step 2, written before the bad step: its weights are all finite
    weights = torch.load(out / 'checkpoint_last.pth', map_location='cpu', weights_only=True)['model']
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
