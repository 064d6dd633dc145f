"""visualize.ipynb runs top to bottom, unedited, on a demo checkpoint and draws one panel per word."""
import json
import os

import nbclient
import nbformat
import pytest

from conftest import ROOT


def test_notebook_draws_one_panel_per_word(pretrained_demo, tmp_path, monkeypatch):
    from PIL import Image
    from ruamel.yaml import YAML
    from conftest import _relocate

    world = pretrained_demo['world']
    with open(os.path.join(ROOT, 'configs', 'demo', 'Grounding.yaml')) as f:
        config = {k: _relocate(v, world) for k, v in YAML(typ='safe').load(f).items()}
    config['bert_config'] = os.path.join(ROOT, config['bert_config'])
    config_path = tmp_path / 'Grounding.yaml'
    with open(config_path, 'w') as f:
        YAML(typ='safe').dump(config, f)
    with open(os.path.join(world, 'grounding_val.json')) as f:
        item = json.load(f)[1]
    figure = tmp_path / 'figure.png'
    monkeypatch.setenv('ALBEF_CHECKPOINT', pretrained_demo['checkpoint'])  # a pre-training checkpoint: converted on load
    monkeypatch.setenv('ALBEF_CONFIG', str(config_path))
    monkeypatch.setenv('ALBEF_IMAGE', os.path.join(world, 'images', item['image']))
    monkeypatch.setenv('ALBEF_CAPTION', item['text'])
    monkeypatch.setenv('ALBEF_FIGURE', str(figure))

    notebook = nbformat.read(os.path.join(ROOT, 'visualize.ipynb'), as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name='python3',
                            resources={'metadata': {'path': ROOT}}).execute()

    words = item['text'].split()                                # the demo vocabulary has whole words only
    with open(tmp_path / 'figure.json') as f:
        assert json.load(f) == {'panels': len(words) + 1, 'words': words}   # the image, then one per word
    width, height = Image.open(figure).size
    assert height / width == pytest.approx(len(words) + 1, rel=0.1)       # square panels stacked vertically
    printed = ''.join(output.get('text', '') for cell in notebook.cells for output in cell.get('outputs', []))
    assert f"{len(words)} words, 4x4 patches: {item['text']}" in printed
