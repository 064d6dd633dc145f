"""Config checks that need neither torch nor the models, so that a mistake in the config or the
command line is reported within a second instead of after the slow imports.

It is the one home of config loading and validation: `load_yaml` reads a YAML file, `load_config`
checks a task config against its record in tasks.py (its keys and the keys every task shares, the
`optimizer` and `schedular` sections, and each value against the check declared beside its key).

A task script calls `precheck(__name__, TASK)` before its other imports. When it runs as the
main program with `--config`, that reads the YAML, checks it against the task's record in
tasks.py (`check_config`: every key, every value, the values that must fit each other, the
bert_config and text_encoder), checks that the annotation files, the `--checkpoint` and the
`--output_dir` fit, and otherwise lets the script start as usual, where `engine.setup` runs the
same checks again (`load_config`) with everything else. A problem ends the process with one line
on stderr and exit status 2, as the scripts' own errors do.
"""
# ---- Ctrl-C while a task script starts (this module is its first import) -----------------------
# Until engine.launch installs its own handling, SIGINT (Ctrl-C) ends the script with one line and
# exit status 130, not a KeyboardInterrupt traceback from inside whatever was importing (torch
# takes seconds). Only for a task script run as the main program (a .py beside this file): pytest,
# notebooks, `python -m ...` tools keep Python's own Ctrl-C. `_signal` is the builtin module under
# `signal`, loaded at once (`signal` first imports enum, time enough for a Ctrl-C to land there).
import _signal
import os
import sys


def _interrupted_while_starting(signum, frame):
    if os.environ.get('RANK', '0') == '0':  # under torchrun every process gets Ctrl-C; one reports
        print('interrupted; nothing more was written (continue with --resume from the last checkpoint, if any)',
              file=sys.stderr, flush=True)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os._exit(130)  # at once: a SystemExit raised inside an import could be caught there


_main_file = getattr(sys.modules.get('__main__'), '__file__', None) or os.sep
if os.path.dirname(os.path.abspath(_main_file)) == os.path.dirname(os.path.abspath(__file__)) \
        and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)
# -----------------------------------------------------------------------------------------------

import argparse
import difflib
import re

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

import tasks

ANNOTATION_KEYS = ('train_file', 'val_file', 'test_file')


class ConfigError(ValueError):
    """A configuration problem, with the file and key in the message."""


def cache_dir():
    """The project's cache folder (annotation tables, shard sizes, downloaded released files):
    $ALBEF_CACHE, else ~/.cache/albef."""
    return os.environ.get('ALBEF_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'albef')


def one_line(error):
    """The message of `error` (an exception, or a text) on one line, for an `error: ...` line: the
    project's one helper for it. A DataLoader worker's error arrives as a traceback text ending in
    `module.Class: message`, of which the last line is kept; the error's own class name in front
    (`ValueError: x`) is dropped; runs of whitespace, line breaks included, become one space; an
    empty message gives the class name."""
    text = str(error).strip()
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else ''
    if 'Traceback (most recent call last)' in text:
        text = text.splitlines()[-1]
    if isinstance(error, BaseException):
        names = [f'{c.__module__}.{c.__qualname__}: ' for c in type(error).__mro__]
        names += [f'{c.__qualname__}: ' for c in type(error).__mro__]
        text = next((text[len(n):] for n in names if text.startswith(n)), text)
    return ' '.join(text.split())


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
        raise ConfigError(f'{where}: YAML syntax error: {one_line(e.problem or e.context or e)}') from None
    except YAMLError as e:
        raise ConfigError(f'{path}: YAML syntax error: {one_line(e)}') from None
    except UnicodeDecodeError as e:
        raise ConfigError(f'{path}: not UTF-8 text (byte {e.start}: {e.reason})') from None
    except OSError as e:
        raise ConfigError(f'{path}: cannot read file: {one_line(e.strerror or e)}') from None
    if not isinstance(config, dict):
        raise ConfigError(f'{path}: expected a mapping of keys to values at the top level')
    return config


# the key tables (their checks: tasks.py), under the names the rest of the code knows
COMMON_KEYS, PRETRAIN_DATA_KEYS = tasks.COMMON_KEYS, tasks.PRETRAIN_DATA_KEYS
OPTIMIZER_KEYS, SCHEDULER_KEYS = tasks.OPTIMIZER_KEYS, tasks.SCHEDULER_KEYS
HUB_NAME = re.compile(r'^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$')  # a Hugging Face model name
VOCABULARY_FILES = ('vocab.txt', 'tokenizer.json')


def check_keys(config, path, required, optional, section=''):
    """Every required key present, and no key outside required | optional (with a suggestion)."""
    where = f'{path}: {section}' if section else f'{path}: '
    known = set(required) | set(optional)
    for key in config:  # unknown keys first: a misspelt required key is reported with its fix
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            raise ConfigError(f"{where}unknown key '{key}'{hint}")
    for key in sorted(required):
        if key not in config:
            raise ConfigError(f"{where}missing required key '{key}'")


def check_values(config, path, checks, section=''):
    """Each value against its check (tasks.py): one line naming the file, the key, the value and what
    is allowed."""
    for key, value in config.items():
        check = checks.get(key)
        if check is not None and not check(value):
            hint = ''
            if isinstance(value, str):
                try:
                    float(value)
                    hint = ' (a string: write numbers without quotes)'
                except ValueError:
                    pass
            raise ConfigError(f'{path}: {section}{key}: expected {check.allowed}, got {value!r}{hint}')


def world_size():
    """The number of processes a launcher started (torchrun's WORLD_SIZE, SLURM's SLURM_NTASKS), else 1."""
    for name in ('WORLD_SIZE', 'SLURM_NTASKS'):
        if os.environ.get(name, '').isdigit():
            return max(int(os.environ[name]), 1)
    return 1


def check_consistency(config, path, task, processes=1):
    """The values that must fit each other: image_res and patch_size, vision_width and its heads,
    queue_size and the global batch."""
    res, patch = config.get('image_res'), config.get('patch_size', 16)
    if isinstance(res, int) and res % patch:
        low, high = res // patch * patch, -(-res // patch) * patch
        raise ConfigError(f'{path}: image_res: {res} is not a multiple of patch_size {patch} (the ViT would never '
                          f'see the last {res % patch} pixel rows and columns of each image): use '
                          + (f'{low} or {high}' if low else f'{high}'))
    width, heads = config.get('vision_width', 768), config.get('vision_num_heads', 12)
    if width % heads:
        raise ConfigError(f'{path}: vision_width: {width} is not a multiple of vision_num_heads {heads}')
    queue, batch = config.get('queue_size'), config.get(task.train_batch)
    if isinstance(queue, int) and isinstance(batch, int) and queue % (batch * processes):
        ranks = f' x {processes} processes (WORLD_SIZE)' if processes > 1 else ''
        raise ConfigError(f'{path}: queue_size: {queue} is not a multiple of the global batch {batch * processes} '
                          f'({task.train_batch} {batch}{ranks}): every step replaces a whole batch in the queues')


def check_paths(config, path, text_encoder=None):
    """The files and folders of the model config: bert_config, text_encoder (or --text_encoder)."""
    bert_config = config.get('bert_config')
    if isinstance(bert_config, str) and not os.path.isfile(bert_config):
        raise ConfigError(f'{path}: bert_config: file not found: {bert_config}')
    where = '--text_encoder' if text_encoder else f'{path}: text_encoder'
    name = text_encoder or config.get('text_encoder')
    if not isinstance(name, str):
        return
    if os.path.isdir(name):
        if not any(os.path.isfile(os.path.join(name, f)) for f in VOCABULARY_FILES):
            raise ConfigError(f"{where}: the folder {name} holds no vocabulary ({' or '.join(VOCABULARY_FILES)})")
    elif name.startswith(('.', '/', '~')) or name.endswith('/') or not HUB_NAME.match(name) or '--' in name \
            or '..' in name:
        raise ConfigError(f'{where}: {name} is no folder (expected a folder holding vocab.txt, or a Hugging Face '
                          f'model name such as bert-base-uncased)')


def check_config(config, path, task, processes=1, text_encoder=None):
    """A task config against the task's record (tasks.py): its keys, the sections' keys, every
    value, the values that must fit each other, and the model's files."""
    task = tasks.get(task)
    check_keys(config, path, set(task.required) | {'optimizer', 'schedular'}, set(task.keys))
    check_values(config, path, task.keys)
    check_keys(config['optimizer'], path, OPTIMIZER_KEYS, tasks.OPTIMIZER_OPTIONAL, 'optimizer.')
    check_values(config['optimizer'], path, {**OPTIMIZER_KEYS, **tasks.OPTIMIZER_OPTIONAL}, 'optimizer.')
    check_keys(config['schedular'], path, SCHEDULER_KEYS, (), 'schedular.')
    check_values(config['schedular'], path, SCHEDULER_KEYS, 'schedular.')
    check_consistency(config, path, task, processes)
    check_paths(config, path, text_encoder)


def load_config(path, task, text_encoder=None):
    """Read a task YAML and check it against the task's record (`check_config`), for the processes
    the launcher started."""
    config = load_yaml(path)
    check_config(config, path, task, world_size(), text_encoder)
    return config


def require_one_of(config, path, keys):
    """At least one of `keys` is set (e.g. train_file or train_shards)."""
    if not any(config.get(key) for key in keys):
        raise ConfigError(f"{path}: needs {' or '.join(repr(k) for k in keys)}")


def check_output_dir(args):
    """An output_dir holding checkpoints is only continued (--resume), started again (--overwrite:
    returns the earlier run's files, which are removed when this run writes its first file) or
    evaluated into (--evaluate writes its log beside the checkpoints)."""
    out = args.output_dir
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f'--output_dir {out} is a file, not a directory')
    if getattr(args, 'overwrite', False) and args.resume:
        raise ConfigError(f'--overwrite and --resume do not go together: --resume continues the run in {out}, '
                          f'--overwrite starts it again (choose one)')
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


def is_bare_name(text):
    """No folder and no extension: a released model's name (models/fetch.py), not a path."""
    return isinstance(text, str) and bool(text) and '/' not in text and os.sep not in text and '.' not in text


def precheck(name, task, argv=None):
    """Check the config and paths of `python SCRIPT --config ...` (the script of `task`) before the
    slow imports."""
    if name != '__main__':
        return
    parser = _Parser(add_help=False, allow_abbrev=False)
    for flag in ('--config', '--output_dir', '--checkpoint', '--text_encoder'):
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
        config = load_config(args.config, task, args.text_encoder)
        for key in ANNOTATION_KEYS:
            paths = config.get(key, [])
            for path in [paths] if isinstance(paths, str) else paths if isinstance(paths, list) else []:
                if isinstance(path, str) and not os.path.isfile(path):
                    raise ConfigError(f'annotation file not found: {path}')
        # a bare name (no folder, no extension) is left to models/fetch.py: a released one or the list
        if args.checkpoint and not os.path.isfile(args.checkpoint) and not is_bare_name(args.checkpoint):
            raise ConfigError(f'checkpoint not found: {args.checkpoint}')
        check_output_dir(args)
    except ConfigError as error:
        if os.environ.get('RANK', '0') == '0':  # under torchrun every process checks; one reports
            print(f'error: {error}', file=sys.stderr, flush=True)
        sys.exit(2)
