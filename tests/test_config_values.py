"""Every config value is checked at start-up, before torch loads (tasks.py declares each key's
check; configuration.precheck runs them): the real script, run as users run it, ends in about a
second with one line naming the file, the key, the value and what is allowed, exit status 2, and
the output_dir as it was. The flags that do not fit, --resume into another model, the exporter and
the data checker are checked here too."""
import os
import subprocess
import sys

import pytest
from ruamel.yaml import YAML

from conftest import ROOT

PY = sys.executable


def config_writer(tmp_path, name='Retrieval'):
    """`write(edit=None, **overrides)` -> path of configs/demo/<name>.yaml with its annotation files,
    image root and bert_config made real in tmp_path (so only the edited value is wrong)."""
    ann = tmp_path / 'ann.json'
    ann.write_text('[]')

    def write(edit=None, **overrides):
        with open(os.path.join(ROOT, 'configs', 'demo', f'{name}.yaml')) as f:
            config = YAML(typ='safe').load(f)
        for key in ('train_file', 'val_file', 'test_file'):
            if key in config:
                config[key] = str(ann)
        config.update(image_root=str(tmp_path), text_encoder='bert-base-uncased',
                      bert_config=os.path.join(ROOT, config['bert_config']))
        for key, value in overrides.items():
            if isinstance(value, dict):
                config[key].update(value)
            else:
                config[key] = value
        if edit:
            edit(config)
        path = tmp_path / 'bad.yaml'
        with open(path, 'w') as f:
            YAML(typ='safe').dump(config, f)
        return str(path)
    return write


@pytest.fixture
def out(out):
    """conftest's output_dir of an earlier run, with a checkpoint too; all must stay as they were."""
    (out / 'checkpoint_00.pth').write_bytes(b'earlier weights')
    return out


def snapshot(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


NOT_A_FOLDER = ('is no folder (expected a folder holding vocab.txt, or a Hugging Face model name such as '
                'bert-base-uncased)')
# (id, overrides of the Retrieval config, extra flags, environment, the expected line after '{config}: ')
CASES = [
    ('lr-string', dict(optimizer={'lr': '1e-4'}), [], {},
     "optimizer.lr: expected a number > 0, got '1e-4' (a string: write numbers without quotes)"),
    ('epochs-0', dict(schedular={'epochs': 0}), [], {}, 'schedular.epochs: expected a positive integer, got 0'),
    ('epochs-negative', dict(schedular={'epochs': -1}), [], {},
     'schedular.epochs: expected a positive integer, got -1'),
    ('warmup-float', dict(schedular={'warmup_epochs': 1.5}), [], {},
     'schedular.warmup_epochs: expected an integer >= 0, got 1.5'),
    ('batch-0', dict(batch_size_train=0), [], {}, 'batch_size_train: expected a positive integer, got 0'),
    ('batch-test-bool', dict(batch_size_test=True), [], {}, 'batch_size_test: expected a positive integer, got True'),
    ('image-res-string', dict(image_res='64'), [], {},
     "image_res: expected a positive integer, got '64' (a string: write numbers without quotes)"),
    ('optimizer-unknown', dict(optimizer={'opt': 'adamx'}), [], {},
     "optimizer.opt: expected one of adamW, got 'adamx'"),
    ('momentum-range', dict(momentum=1.5), [], {}, 'momentum: expected a number >= 0 and <= 1, got 1.5'),
    ('temp-0', dict(temp=0), [], {}, 'temp: expected a number > 0, got 0'),
    ('amp-unknown', dict(amp='fp32'), [], {}, "amp: expected bf16, fp16 or off (null: the default), got 'fp32'"),
    ('distill-string', dict(distill='yes'), [], {}, "distill: expected true or false, got 'yes'"),
    ('compile-unknown', dict(compile='graph'), [], {},
     "compile: expected true (= layers), false, layers or step, got 'graph'"),
    ('workers-negative', dict(num_workers=-1), [], {}, 'num_workers: expected an integer >= 0, got -1'),
    ('queue-batch', dict(queue_size=100), [], {},
     'queue_size: 100 is not a multiple of the global batch 32 (batch_size_train 32): every step replaces a whole '
     'batch in the queues'),
    ('queue-world', dict(queue_size=96), [], {'WORLD_SIZE': '2', 'RANK': '0'},
     'queue_size: 96 is not a multiple of the global batch 64 (batch_size_train 32 x 2 processes (WORLD_SIZE)): '
     'every step replaces a whole batch in the queues'),
    ('patch', dict(image_res=70), [], {},
     'image_res: 70 is not a multiple of patch_size 16 (the ViT would never see the last 6 pixel rows and columns '
     'of each image): use 64 or 80'),
    ('heads', dict(vision_width=130), [], {}, 'vision_width: 130 is not a multiple of vision_num_heads 4'),
    ('bert-config', dict(bert_config='configs/demo/no_bert.json'), [], {},
     'bert_config: file not found: configs/demo/no_bert.json'),
    ('text-encoder-path', dict(text_encoder='data/demo/no_text_encoder'), [], {},
     f'text_encoder: data/demo/no_text_encoder {NOT_A_FOLDER}'),
    ('text-encoder-vocab', dict(text_encoder='{tmp}'), [], {},
     'text_encoder: the folder {tmp} holds no vocabulary (vocab.txt or tokenizer.json)'),
    ('typo', dict(image_rot='x'), [], {}, "unknown key 'image_rot' (did you mean 'image_root'?)"),
]
FLAG_CASES = [  # (id, flags, the expected line)
    ('text-encoder-flag', ['--text_encoder', './nowhere'], f'--text_encoder: ./nowhere {NOT_A_FOLDER}'),
    ('overwrite-resume', ['--overwrite', '--resume'],
     '--overwrite and --resume do not go together: --resume continues the run in {out}, --overwrite starts it '
     'again (choose one)'),
]


def run_retrieval(config, out, flags=(), env=None):
    return subprocess.run([PY, os.path.join(ROOT, 'Retrieval.py'), '--config', config, '--output_dir', str(out),
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize('case', CASES + FLAG_CASES, ids=lambda case: case[0])
def test_a_bad_value_ends_the_script_in_one_line(case, tmp_path, out):
    if len(case) == 5:
        _, overrides, flags, env, expected = case
        overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
        config = config_writer(tmp_path)(**overrides)
        expected = f'{config}: ' + expected.format(tmp=tmp_path)
    else:
        _, flags, expected = case
        config, env = config_writer(tmp_path)(), {}
        expected = expected.format(out=out)
    before = snapshot(out)
    result = run_retrieval(config, out, flags, env)
    assert (result.returncode, result.stderr, result.stdout) == (2, f'error: {expected}\n', '')
    assert snapshot(out) == before


def test_an_unknown_flag_is_one_line(capsys):
    import Retrieval
    with pytest.raises(SystemExit) as exit_info:
        Retrieval.get_parser().parse_args(['--config', 'x.yaml', '--bogus', '3'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == \
        'error: unrecognized arguments: --bogus 3 (--help lists the flags)\n'


def test_eval_amp_is_a_flag_and_a_config_key(tmp_path):
    import torch

    import Retrieval
    from engine.options import effective_config
    config = config_writer(tmp_path)(eval_amp=True)
    import configuration
    loaded = configuration.load_config(config, Retrieval.TASK)
    parse = Retrieval.get_parser().parse_args
    cpu = torch.device('cpu')
    assert effective_config(parse(['--config', config]), loaded, cpu)[0]['eval_amp'] is True
    assert effective_config(parse(['--config', config]), {**loaded, 'eval_amp': False}, cpu)[0]['eval_amp'] is False
    assert effective_config(parse(['--eval_amp']), {**loaded, 'eval_amp': False}, cpu)[0]['eval_amp'] is True


def test_the_flags_said_to_be_config_keys_are_config_keys(tmp_path):
    """Every flag of the groups whose title says it is also a config key: a config may set it (a key
    of tasks.COMMON_KEYS), and the flag wins over the key in the effective config."""
    import torch

    import tasks
    from engine.options import ALSO_A_KEY, SPEED_FLAGS, TRAINING_FLAGS, effective_config, get_args_parser
    parser = get_args_parser('c.yaml', 'out')
    flags = {}  # dest -> its first flag (--compile, not --no-compile)
    for group in parser._action_groups:
        if (group.title or '').endswith(ALSO_A_KEY):
            for action in group._group_actions:
                flags.setdefault(action.dest, action.option_strings[0])
    assert set(flags) == set(SPEED_FLAGS + TRAINING_FLAGS)
    assert set(flags) <= set(tasks.COMMON_KEYS)
    in_config = {'amp': 'off', 'grad_checkpointing': False, 'accum_steps': 1, 'compile': False, 'eval_amp': True,
                 'num_threads': 1, 'freeze_vision': False, 'freeze_text': False, 'grad_clip_norm': 2.0}
    by_flag = {'amp': 'bf16', 'grad_checkpointing': True, 'accum_steps': 3, 'compile': 'step', 'eval_amp': False,
               'num_threads': 2, 'freeze_vision': 1, 'freeze_text': 2, 'grad_clip_norm': 0.5}
    argv = ['--config', 'c.yaml', '--no-eval_amp']
    for key, value in by_flag.items():
        if not isinstance(value, bool):
            argv += [flags[key], str(value)]
        elif value:
            argv.append(flags[key])
    assert set(in_config) == set(by_flag) == set(flags)
    config = effective_config(parser.parse_args(argv), in_config, torch.device('cpu'))[0]
    assert {key: config[key] for key in flags} == by_flag


def test_a_null_image_path_is_a_data_error(tmp_path):
    import json

    from dataset import DataError, create_dataset
    ann = tmp_path / 'train.json'
    ann.write_text(json.dumps([{'image': 'a.jpg', 'caption': 'x', 'image_id': 0},
                               {'image': None, 'caption': 'y', 'image_id': 1}]))
    config = {'train_file': [str(ann)], 'val_file': str(ann), 'test_file': str(ann), 'image_root': str(tmp_path),
              'image_res': 16, 'check_images': False}
    with pytest.raises(DataError) as error:
        create_dataset('re', config)  # the original's name of the retrieval datasets
    assert str(error.value) == f"{ann}: item 1 has 'image' of type NoneType (expected a string)"


def test_resume_into_another_model_is_one_line(demo_config, tmp_path, capsys):
    """A checkpoint of 4 ViT blocks, resumed with a config of 3: one line, not torch's 17."""
    import torch

    import configuration
    import engine
    import Pretrain
    from models.model_pretrain import ALBEF
    from models.tokenization_bert import BertTokenizer
    config = demo_config('Pretrain', batch_size=8, queue_size=32, num_workers=0)
    cfg = configuration.load_yaml(config)
    model = ALBEF(config=cfg, tokenizer=BertTokenizer.from_pretrained(cfg['text_encoder']), init_deit=False)
    out = tmp_path / 'out'
    out.mkdir()
    torch.save({'model': model.state_dict(), 'config': cfg, 'epoch': 0}, out / 'checkpoint_00.pth')
    smaller = demo_config('Pretrain', batch_size=8, queue_size=32, num_workers=0, vision_depth=3)
    before = snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        engine.launch(Pretrain.main, Pretrain.get_parser(), ['--config', smaller, '--output_dir', str(out),
                                                             '--device', 'cpu', '--resume', '--log_to', 'none'])
    assert exit_info.value.code == 2 and snapshot(out) == before
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f'error: --resume: {out / "checkpoint_00.pth"} holds another model than {smaller} describes (vision_depth: '
        f'4 in the checkpoint, 3 in the config); resume with the config of that run ({out / "config.yaml"}), or '
        f'start a new --output_dir')


def test_export_refuses_to_replace_an_export(tmp_path, capsys):
    from models import export
    out = tmp_path / 'export'
    out.mkdir()
    (out / 'model.safetensors').write_bytes(b'an earlier export')
    (out / 'config.json').write_text('{}')
    before = snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / 'any.pth'), '--out', str(out)])
    assert exit_info.value.code == 2 and snapshot(out) == before
    assert capsys.readouterr().err == (f'error: --out {out} already holds an export (model.safetensors): pass '
                                       f'--overwrite to replace it, or choose another directory\n')


def test_the_allowed_values_are_the_ones_the_code_knows():
    """tasks.py names the choices before torch loads; they are the ones the modules that use them accept."""
    import tasks
    from dataset.randaugment import AUTOCONTRAST_MODES
    from dataset.vqa_eval import NORMALIZATIONS
    from engine.options import AMP_MODES, COMPILE_MODES
    keys = {**tasks.COMMON_KEYS, **tasks.TASK_KEYS}
    assert keys['randaugment_autocontrast'].allowed == 'one of ' + ', '.join(AUTOCONTRAST_MODES)
    assert keys['vqa_normalization'].allowed == 'one of ' + ', '.join(NORMALIZATIONS)
    assert [mode for mode in ('bf16', 'fp16', 'off', 'fp32') if keys['amp'](mode)] == list(AMP_MODES)
    assert [mode for mode in ('layers', 'step', 'graph', 'whole') if keys['compile'](mode)] == list(COMPILE_MODES)
