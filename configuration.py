"""Config checks that need neither torch nor the models, so that a mistake in the config or the
command line is reported within a second instead of after the slow imports.

It is the one home of config loading and validation: `load_yaml` reads a YAML file, `load_config`
checks a task config against its script's schema (`REQUIRED` / `OPTIONAL`) and the keys every task
shares (`COMMON_KEYS`, the `optimizer` and `schedular` sections).

A task script calls `precheck(__name__, __file__)` before its other imports. When it runs as the
main program with `--config`, that reads the YAML, checks its keys against the script's
`REQUIRED` / `OPTIONAL` sets (read from the script's source, not imported) and the common keys,
checks that the annotation files, the `--checkpoint` and the `--output_dir` fit, and otherwise
lets the script start as usual, where the same checks run again with everything else. A problem
ends the process with one line on stderr and exit status 2, as the scripts' own errors do.
"""
import argparse
import ast
import difflib
import os
import sys

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

ANNOTATION_KEYS = ('train_file', 'val_file', 'test_file')


class ConfigError(ValueError):
    """A configuration problem, with the file and key in the message."""


def _one_line(text):
    return ' '.join(str(text).split())


def load_yaml(path):
    """The YAML mapping at `path`; a missing or unreadable file, a syntax error or a top level that
    is not a mapping raises ConfigError with a one-line message naming the file."""
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    try:
        with open(path, encoding='utf-8') as f:
            config = YAML(typ='safe').load(f)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f'{path}:{mark.line + 1}:{mark.column + 1}' if mark is not None else path
        raise ConfigError(f'{where}: YAML syntax error: {_one_line(e.problem or e.context or e)}') from None
    except YAMLError as e:
        raise ConfigError(f'{path}: YAML syntax error: {_one_line(e)}') from None
    except UnicodeDecodeError as e:
        raise ConfigError(f'{path}: not UTF-8 text (byte {e.start}: {e.reason})') from None
    except OSError as e:
        raise ConfigError(f'{path}: cannot read file: {_one_line(e.strerror or e)}') from None
    if not isinstance(config, dict):
        raise ConfigError(f'{path}: expected a mapping of keys to values at the top level')
    return config


# keys every task config may carry besides its own
COMMON_KEYS = {
    'bert_config', 'image_res', 'vision_width', 'vision_depth', 'vision_num_heads', 'patch_size',
    'text_encoder', 'init_text_encoder', 'num_workers', 'print_freq', 'save_every_steps',
    'skip_bad_images', 'check_images', 'augment', 'randaugment_autocontrast', 'optimizer', 'schedular', 'amp',
    'accum_steps', 'grad_checkpointing', 'compile', 'log_to', 'trust_checkpoint', 'keep_checkpoints',
    'num_threads',
    'freeze_vision', 'freeze_text', 'grad_clip_norm',
}
OPTIMIZER_KEYS = {'opt', 'lr', 'weight_decay'}
SCHEDULER_KEYS = {'sched', 'lr', 'epochs', 'min_lr', 'decay_rate', 'warmup_lr', 'warmup_epochs',
                  'cooldown_epochs'}


def check_keys(config, path, required, optional, section=''):
    """Every required key present, and no key outside required | optional (with a suggestion)."""
    where = f'{path}: {section}' if section else f'{path}: '
    known = set(required) | set(optional)
    for key in config:  # unknown keys first: a misspelt required key is reported with its fix
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            raise ConfigError(f"{where}unknown key '{key}'{hint}")
    for key in sorted(required):
        if key not in config:
            raise ConfigError(f"{where}missing required key '{key}'")


# config keys of the pre-training data (Pretrain.py, Pretrain_nlvr.py): a JSON train_file, tar
# shards, or both (see dataset/shards.py)
PRETRAIN_DATA_KEYS = {'train_file', 'train_shards', 'shuffle_buffer', 'samples_per_epoch', 'jpeg_draft'}


def _key_set(node):
    """A set expression of a script's schema: set literals, `configuration.NAME` and their unions."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _key_set(node.left) | _key_set(node.right)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == 'configuration':
        return set(globals()[node.attr])
    return set(ast.literal_eval(node))


def literal_sets(path, names):
    """The set assignments `NAME = {...}` (literals, `configuration.NAME` and their unions) at the
    top level of a Python file, read without importing it."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in names:
            found[node.targets[0].id] = _key_set(node.value)
    return found


def check_config(config, path, required, optional=()):
    """A task config's keys against its schema, the common keys and the two sections' keys."""
    check_keys(config, path, set(required) | {'optimizer', 'schedular'}, COMMON_KEYS | set(optional))
    check_keys(config['optimizer'], path, OPTIMIZER_KEYS, {'fused'}, 'optimizer.')
    check_keys(config['schedular'], path, SCHEDULER_KEYS, (), 'schedular.')


def load_config(path, required, optional=()):
    """Read a task YAML and validate its keys against the task's schema."""
    config = load_yaml(path)
    check_config(config, path, required, optional)
    return config


def require_one_of(config, path, keys):
    """At least one of `keys` is set (e.g. train_file or train_shards)."""
    if not any(config.get(key) for key in keys):
        raise ConfigError(f"{path}: needs {' or '.join(repr(k) for k in keys)}")


def check_script_keys(config, path, script):
    """The config's keys against a task script's schema (read from its source, not imported)."""
    schema = literal_sets(script, ('REQUIRED', 'OPTIONAL'))
    check_config(config, path, schema.get('REQUIRED', set()), schema.get('OPTIONAL', set()))


def check_output_dir(args):
    """An output_dir holding checkpoints is only continued (--resume), started again (--overwrite:
    returns the earlier run's files, which are removed when this run writes its first file) or
    evaluated into (--evaluate writes its log beside the checkpoints)."""
    out = args.output_dir
    names = sorted(os.listdir(out)) if out and os.path.isdir(out) else []
    checkpoints = [n for n in names if n.startswith('checkpoint') and n.endswith('.pth')]
    if not checkpoints or args.resume or getattr(args, 'evaluate', False):
        return []
    if not getattr(args, 'overwrite', False):
        raise ConfigError(f"{out} holds checkpoints of an earlier run ({', '.join(checkpoints)}): continue it with "
                          f"--resume, start again with --overwrite, or choose another --output_dir")
    return checkpoints + [n for n in ('log.txt', 'config.yaml') if n in names]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # the script's own parser reports a bad command line
        raise ValueError(message)


def precheck(name, script, argv=None):
    """Check the config and paths of `python SCRIPT --config ...` before the slow imports."""
    if name != '__main__':
        return
    parser = _Parser(add_help=False, allow_abbrev=False)
    for flag in ('--config', '--output_dir', '--checkpoint'):
        parser.add_argument(flag)
    for flag in ('--resume', '--overwrite', '--evaluate'):
        parser.add_argument(flag, action='store_true')
    try:
        args, _ = parser.parse_known_args(argv)
    except ValueError:
        return
    if not args.config:
        return
    try:
        config = load_yaml(args.config)
        check_script_keys(config, args.config, script)
        for key in ANNOTATION_KEYS:
            paths = config.get(key, [])
            for path in [paths] if isinstance(paths, str) else paths if isinstance(paths, list) else []:
                if isinstance(path, str) and not os.path.isfile(path):
                    raise ConfigError(f'annotation file not found: {path}')
        if args.checkpoint and not os.path.isfile(args.checkpoint):
            raise ConfigError(f'checkpoint not found: {args.checkpoint}')
        check_output_dir(args)
    except ConfigError as error:
        if os.environ.get('RANK', '0') == '0':  # under torchrun every process checks; one reports
            print(f'error: {error}', file=sys.stderr, flush=True)
        sys.exit(2)
