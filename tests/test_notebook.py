"""visualize.ipynb, unedited and with no settings, right after the README's demo command: it finds
the newest demo checkpoint under output/demo/, draws the default photograph, the whole caption's
map and one panel per word, and writes nothing."""
import base64
import io
import os
import re

import nbclient
import nbformat
import pytest

from conftest import ROOT


def test_notebook_runs_as_documented(pretrained_demo, tmp_path, monkeypatch):
    from PIL import Image
    # a working directory laid out as the repository after the demo command: the demo checkpoint
    # under output/demo/, and a newer VQA checkpoint, which has no ITM head and is passed over
    (tmp_path / 'examples').symlink_to(os.path.join(ROOT, 'examples'))
    demo = tmp_path / 'output' / 'demo'
    (demo / 'pretrain').mkdir(parents=True)
    (demo / 'pretrain' / 'checkpoint_29.pth').symlink_to(pretrained_demo['checkpoint'])
    (demo / 'vqa').mkdir()
    _vqa_checkpoint(pretrained_demo, demo / 'vqa' / 'checkpoint_00.pth')
    before = sorted(str(p) for p in tmp_path.rglob('*'))
    for name in [k for k in os.environ if k.startswith('ALBEF_')]:
        monkeypatch.delenv(name)
    monkeypatch.setenv('PYTHONPATH', ROOT)

    notebook = nbformat.read(os.path.join(ROOT, 'visualize.ipynb'), as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name='python3',
                            resources={'metadata': {'path': str(tmp_path)}}).execute()

    printed = ''.join(output.get('text', '') for cell in notebook.cells for output in cell.get('outputs', []))
    assert 'checkpoint: output/demo/pretrain/checkpoint_29.pth (pretrain, 64 px)' in printed
    words = 'a white circle on a red circle'.split()  # the default caption, all in the demo vocabulary
    assert re.search(rf"\b{len(words)} words, ITM match probability [01]\.\d{{3}}: {' '.join(words)}\n", printed)
    assert f"panels: image, whole caption, {', '.join(words)}\n" in printed
    figures = [output['data']['image/png'] for cell in notebook.cells for output in cell.get('outputs', [])
               if 'image/png' in output.get('data', {})]
    assert len(figures) == 1
    width, height = Image.open(io.BytesIO(base64.b64decode(figures[0]))).size
    photo = Image.open(os.path.join(ROOT, 'examples', 'coffee.jpg'))
    # the photograph, the whole caption, then one panel per word, stacked vertically at the
    # photograph's aspect ratio
    assert height / width == pytest.approx((len(words) + 2) * photo.height / photo.width, rel=0.1)
    assert sorted(str(p) for p in tmp_path.rglob('*')) == before   # nothing written


def _vqa_checkpoint(pretrained_demo, path):
    """A VQA model's checkpoint converted from the demo pre-training one (no training needed)."""
    import torch
    from models.checkpoint import pretrain_to_vqa, read_state_dict, strip_for_release
    state_dict = strip_for_release(pretrain_to_vqa(read_state_dict(pretrained_demo['checkpoint'])))
    torch.save({'model': state_dict, 'config': pretrained_demo['config']}, path)
