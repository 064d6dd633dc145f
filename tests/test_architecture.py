"""The layers of docs/ARCHITECTURE.md hold: no module imports upwards. Every import statement of
the project's code (at the top of a file or inside a function) is read with `ast`, and the project
module it names must be one its layer may use."""
import ast
import os

import pytest

from conftest import ROOT

SCRIPTS = {'Pretrain', 'Pretrain_nlvr', 'Retrieval', 'VQA', 'VE', 'NLVR', 'Grounding'}
BASE = {'utils', 'configuration', 'tasks'}
LIBRARY = BASE | {'models', 'dataset', 'optim', 'scheduler'}
# layer -> the top-level project modules its code may import
MAY_IMPORT = {
    'base': {'tasks'},  # configuration.py reads the task table; tasks.py itself imports nothing
    'tracking': BASE,
    'library': LIBRARY,
    'engine': LIBRARY | {'tracking', 'engine'},
    'scripts': LIBRARY | {'tracking', 'engine'},
    'demo': LIBRARY | {'demo'},
}
PROJECT = LIBRARY | SCRIPTS | {'tracking', 'engine', 'demo', 'benchmarks', 'tests'}


def layer_of(rel):
    top = rel.split(os.sep)[0].removesuffix('.py')
    if top in BASE:
        return 'base'
    if top in LIBRARY:
        return 'library'
    if top in SCRIPTS:
        return 'scripts'
    return top if top in MAY_IMPORT else None


def project_imports(path):
    """(line, top-level project module) of every import in the file; relative imports stay inside
    their own package."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split('.')[0]
            if top in PROJECT:
                yield node.lineno, top


def checked_files():
    for top in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, top)
        if top.endswith('.py') and layer_of(top):
            yield top
        elif os.path.isdir(path) and layer_of(top):
            for name in sorted(os.listdir(path)):
                if name.endswith('.py'):
                    yield os.path.join(top, name)


def test_every_layer_is_checked():
    layers = {layer_of(rel) for rel in checked_files()}
    assert layers == set(MAY_IMPORT)
    assert {rel.removesuffix('.py') for rel in checked_files() if layer_of(rel) == 'scripts'} == SCRIPTS


@pytest.mark.parametrize('rel', list(checked_files()))
def test_no_import_upwards(rel):
    allowed = MAY_IMPORT[layer_of(rel)] - ({'tasks'} if rel == 'tasks.py' else set())
    wrong = [f'{rel}:{line} imports {top}' for line, top in project_imports(os.path.join(ROOT, rel))
             if top not in allowed and top != rel.split(os.sep)[0]]
    assert not wrong, f'{wrong} (docs/ARCHITECTURE.md: layer {layer_of(rel)} may import {sorted(allowed)})'


def test_the_check_sees_a_wrong_import(tmp_path):
    path = tmp_path / 'x.py'
    path.write_text('def f():\n    import engine.run\n    from Retrieval import main\n    from . import y\n')
    assert list(project_imports(str(path))) == [(2, 'engine'), (3, 'Retrieval')]


# ---- state flows one way ------------------------------------------------------------------------
def test_setup_writes_nothing_back_into_args(demo_config, tmp_path):
    """engine.setup reads the flags and the YAML and returns a Run; the flags stay as parsed."""
    import copy

    import engine
    import VE
    args = VE.get_parser().parse_args(['--config', demo_config('VE'), '--output_dir', str(tmp_path / 'out'),
                                       '--device', 'cpu', '--amp', 'off', '--log_to', 'none'])
    before = copy.deepcopy(vars(args))
    run = engine.setup(args, VE.TASK)
    assert vars(args) == before
    assert (run.rank, run.world_size, run.device.type, run.amp) == (0, 1, 'cpu', 'off')
    assert run.tokenizer is not None and run.config['log_to'] == 'none' and run.config['accum_steps'] == 1
    assert not os.path.exists(tmp_path / 'out')  # nothing written before the first checkpoint or log line


def test_every_script_defaults_to_output_task(monkeypatch):
    """Each script's default --config is a config of its own task (it passes that task's checks),
    and its default --output_dir is output/<that config's name>: no two scripts share a folder."""
    import importlib

    import configuration
    monkeypatch.chdir(ROOT)  # the defaults are relative to the repository, as users run the scripts
    folders = {}
    for script in sorted(SCRIPTS):
        module = importlib.import_module(script)
        assert module.TASK.script == script + '.py'
        parser = module.get_parser()
        config, output_dir = parser.get_default('config'), parser.get_default('output_dir')
        name = os.path.splitext(os.path.basename(config))[0]
        assert os.path.normpath(output_dir) == os.path.join('output', name), (script, config, output_dir)
        configuration.check_config(configuration.load_yaml(config), config, module.TASK, processes=8)
        folders[script] = output_dir
    assert len(set(folders.values())) == len(SCRIPTS), folders


# ---- one home for the tasks ---------------------------------------------------------------------
def task_lists(path, names):
    """(line, names) of every tuple, list, set or dict literal of the file that holds two or more of
    `names` (task names, their aliases, their scripts) as strings: a list of the tasks."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        elements = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(
            node, (ast.Tuple, ast.List, ast.Set)) else []
        found = [e.value for e in elements if isinstance(e, ast.Constant) and e.value in names]
        if len(found) >= 2:
            yield node.lineno, found


def test_only_tasks_py_lists_the_tasks():
    """Adding a task means its record in tasks.py, its script, its model and its dataset module:
    no other file keeps a list of the tasks."""
    import tasks
    names = set(tasks.names(with_aliases=True)) | {t.script for t in tasks.TASKS} | {
        t.script.removesuffix('.py') for t in tasks.TASKS}
    lists = [f'{rel}:{line} {found}' for rel in checked_files() if rel != 'tasks.py'
             for line, found in task_lists(os.path.join(ROOT, rel), names)]
    assert not lists, f'{lists}: read the tasks from tasks.py instead'


def test_the_task_list_check_sees_a_list(tmp_path):
    path = tmp_path / 'x.py'
    path.write_text("A = {'re': 1, 've': 2}\nB = ('pretrain', 'x')\nif t in ('nlvr', 'pretrain_nlvr'): pass\n")
    assert list(task_lists(str(path), {'re', 've', 'nlvr', 'pretrain_nlvr', 'pretrain'})) == \
        [(1, ['re', 've']), (3, ['nlvr', 'pretrain_nlvr'])]
