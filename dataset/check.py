"""Check a task's data before a run: every annotation file, item and image of a config.

    python -m dataset.check configs/Retrieval_flickr.yaml [--task retrieval] [--write-clean OUT_DIR]

Reads the YAML, finds the task whose keys (tasks.py) it fits best (or `--task`), checks it as that
task's script does (an unknown or missing key, a value out of range, a missing bert_config: an
unusable config), reads every annotation file of every split, checks each item's keys and
values as the dataset classes do, and
opens, verifies and fully decodes every image with PIL (a truncated file is unreadable; a 16-bit
image is noted). It then measures how much of the training text the config's vocabulary
(`text_encoder`) reads as [UNK]. Every problem is printed on its own line, then a summary. The
exit status is 1 if anything was found, else 0 (2 for an unusable config). `--write-clean OUT_DIR` writes each
annotation file without its bad items to OUT_DIR under the same base name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Sequence

import tasks
from configuration import ConfigError, check_config, load_yaml, one_line, world_size

from . import TASKS
from .base import DataError, Problem, as_file_list, max_image_pixels, read_json_list

UNK_LIMIT = 0.05  # above this share of [UNK] word pieces the scripts warn
TEXT_KEYS = ('caption', 'sentence', 'question', 'text')


def load_config(path: str) -> dict:
    """The YAML config at `path` (`configuration.load_yaml`), its errors raised as DataError."""
    try:
        return load_yaml(path)
    except ConfigError as e:
        raise DataError(str(e)) from None


def key_misfit(config: dict, task: tasks.Task) -> int:
    """How far the config's keys are from the task's: its unknown keys plus its missing required keys."""
    known = set(task.keys)
    return sum(key not in known for key in config) + sum(key not in config for key in task.required)


def infer_task(config: dict) -> str:
    """The task whose keys (tasks.py) the config fits best; the first in the table on a tie. A
    misspelt key then reads as that task's unknown key, not as another task."""
    return min(tasks.TASKS, key=lambda task: key_misfit(config, task)).name


def config_problem(config: dict, path: str, task: str) -> str | None:
    """The first problem of the config (keys, values, bert_config, text_encoder), as the task's
    script reports it, or None."""
    try:
        check_config(config, path, task, world_size())
    except ConfigError as e:
        return str(e)
    return None


def sample_texts(items: Sequence, limit: int = 1000) -> list[str]:
    """Up to `limit` texts (captions, sentences, questions; the first of a caption list) from items
    spread evenly over `items`."""
    texts: list[str] = []
    step = max(1, len(items) // limit)
    for index in range(0, len(items), step):
        item = items[index]
        if not isinstance(item, dict):
            continue
        for key in TEXT_KEYS:
            value = item.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, str):
                texts.append(value)
    return texts[:limit]


def unk_rate(texts: Sequence[str], tokenizer) -> tuple[float, list[str]]:
    """(share of the texts' word pieces that are [UNK], the three texts with the largest share)."""
    total = unknown = 0
    shares = []
    for text in texts:
        pieces = tokenizer.tokenize(text)
        count = sum(piece == tokenizer.unk_token for piece in pieces)
        total, unknown = total + len(pieces), unknown + count
        if count:
            shares.append((-count / len(pieces), len(shares), text))
    return unknown / max(total, 1), [text for _, _, text in sorted(shares)[:3]]


def vocabulary_path(text_encoder: str) -> str:
    path = os.path.join(str(text_encoder), 'vocab.txt')
    return path if os.path.isfile(path) else str(text_encoder)


def unk_report(dataset, tokenizer, text_encoder: str, limit: float = UNK_LIMIT, always: bool = False) -> str | None:
    """One line on the [UNK] share of a sample of the dataset's texts: when it is above `limit`
    (or `always`), else None."""
    texts = sample_texts(getattr(dataset, 'ann', dataset))
    if not texts:
        return None
    rate, examples = unk_rate(texts, tokenizer)
    if rate <= limit and not always:
        return None
    line = (f'{rate:.1%} of the word pieces of {len(texts)} sampled training texts are [UNK] in the vocabulary '
            f'{vocabulary_path(text_encoder)}')
    if rate > limit:
        line += (f" (above {limit:.0%}; e.g. {'; '.join(repr(t) for t in examples)}): use a text_encoder whose "
                 f"vocabulary covers these texts")
    return line


def vocabulary_line(config: dict) -> str:
    """dataset.check's report on the [UNK] share of the training texts."""
    text_encoder = config.get('text_encoder', 'bert-base-uncased')
    items = []
    for path in as_file_list(config.get('train_file', [])):
        try:
            items += read_json_list(path)
        except DataError:
            continue
    try:
        from models.tokenization_bert import BertTokenizer
        tokenizer = BertTokenizer.from_pretrained(text_encoder)
    except Exception as e:  # offline, a missing directory, ...
        return f'vocabulary: cannot load the tokenizer of {text_encoder} ({one_line(e)[:200]})'
    line = unk_report(items, tokenizer, text_encoder, always=True)
    return f'vocabulary: {line}' if line else 'vocabulary: no training texts to measure'


def scan(config: dict, task: str, workers: int = 8, progress: bool = True) -> tuple[list[Problem], dict[str, int]]:
    """All problems of the task's data, and the number of items of each readable annotation file."""
    problems: list[Problem] = []
    counts: dict[str, int] = {}
    done = set()
    for split in TASKS[task]:
        if split.file_key not in config:
            problems.append(Problem('file', '', None, f"config has no '{split.file_key}' ({split.name} split)"))
            continue
        for path in as_file_list(config[split.file_key]):
            key = (split.cls, tuple(sorted(split.kwargs.items())), path)  # e.g. val_file == test_file
            if key in done:
                continue
            done.add(key)
            try:
                dataset = split.build(config, ann_file=path, check_images=False, strict=False,
                                      max_image_pixels=max_image_pixels(config))
            except DataError as e:  # a config key is missing
                problems.append(Problem('file', '', None, str(e)))
                break
            problems += dataset.problems
            problems += dataset.image_problems(workers=workers, progress=progress,
                                               desc=f'{split.name} {os.path.basename(path)}')
            if not any(p.kind == 'file' and p.file == path for p in dataset.problems):
                # items in the file: the valid ones plus those left out
                counts[path] = len(dataset) + sum(p.kind == 'item' and p.file == path for p in dataset.problems)
    unique, seen = [], set()
    for problem in problems:
        if problem.message not in seen:
            seen.add(problem.message)
            unique.append(problem)
    return unique, counts


def write_clean(problems: Sequence[Problem], counts: dict[str, int], out_dir: str) -> None:
    """Write every readable annotation file minus its bad items to `out_dir` (same base name)."""
    os.makedirs(out_dir, exist_ok=True)
    bad: dict[str, set[int]] = {}
    for problem in problems:
        if problem.index is not None:
            bad.setdefault(problem.file, set()).add(problem.index)
    written: dict[str, str] = {}
    for path in counts:
        name = os.path.basename(path)
        if name in written:
            print(f'not written: {path} (a file named {name} was already written from {written[name]})')
            continue
        items = read_json_list(path)
        clean = [item for i, item in enumerate(items) if i not in bad.get(path, ())]
        target = os.path.join(out_dir, name)
        with open(target, 'w', encoding='utf-8') as f:
            json.dump(clean, f)
        written[name] = path
        print(f'wrote {target}: {len(clean)} of {len(items)} items ({len(items) - len(clean)} removed)')
    for problem in problems:
        if problem.kind == 'file' and problem.file and problem.file not in counts:
            print(f'not written: {problem.file} (unreadable)')


def summary(problems: Sequence[Problem], counts: dict[str, int]) -> str:
    kinds = Counter(p.kind for p in problems)
    if not problems:
        return f'OK: {sum(counts.values())} items in {len(counts)} annotation files, no problems'
    bad_items = len({(p.file, p.index) for p in problems if p.index is not None})
    parts = [f'{kinds[k]} {label}' for k, label in (('file', 'unusable file(s)'), ('item', 'bad annotation(s)'),
                                                     ('missing_image', 'missing image(s)'),
                                                     ('bad_image', 'unreadable image(s)')) if kinds[k]]
    return (f'{len(problems)} problem(s): ' + ', '.join(parts)
            + f'; {bad_items} bad item(s) of {sum(counts.values())} in {len(counts)} readable annotation file(s)')


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m dataset.check', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='task YAML (configs/*.yaml)')
    parser.add_argument('--task', choices=tasks.names(with_aliases=True),
                        help="default: the task whose keys the config's fit best")
    parser.add_argument('--write-clean', metavar='OUT_DIR',
                        help='write each annotation file without its bad items to OUT_DIR')
    parser.add_argument('--workers', type=int, default=8, help='threads opening images (default 8)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        task = tasks.get(args.task).name if args.task else infer_task(config)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    problem = config_problem(config, args.config, task)
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        return 2
    print(f'checking the {task} data of {args.config}', file=sys.stderr)
    problems, counts = scan(config, task, workers=args.workers, progress=not args.no_progress)
    notes = [p for p in problems if p.kind == 'note']
    problems = [p for p in problems if p.kind != 'note']
    for problem in problems:
        print(problem.message)
    for note in notes:
        print(f'note: {note.message}')
    print(vocabulary_line(config))
    print(summary(problems, counts))
    if args.write_clean:
        write_clean(problems, counts, args.write_clean)
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
