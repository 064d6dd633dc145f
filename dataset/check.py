"""Check a task's data before a run: every annotation file, item and image of a config.

    python -m dataset.check configs/Retrieval_flickr.yaml [--task re] [--write-clean OUT_DIR]

Reads the YAML, finds the task from its keys (or `--task`), reads every annotation file of every
split, checks each item's keys and values as the dataset classes do, and opens and verifies every
image with PIL. Every problem is printed on its own line, then a summary. The exit status is 1 if
anything was found, else 0 (2 for an unusable config). `--write-clean OUT_DIR` writes each
annotation file without its bad items to OUT_DIR under the same base name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Sequence

from ruamel.yaml import YAML

from . import TASKS
from .base import DataError, Problem, as_file_list, read_json_list


def load_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f'config not found: {path}')
    with open(path) as f:
        config = YAML(typ='safe').load(f)
    if not isinstance(config, dict):
        raise DataError(f'{path}: expected a mapping of config keys')
    return config


def _first_item(config: dict) -> dict:
    """The first annotation item of the config's train file(s), or {} if there is none to read."""
    for path in as_file_list(config.get('train_file', [])):
        try:
            items = read_json_list(path)
        except DataError:
            continue
        if items and isinstance(items[0], dict):
            return items[0]
    return {}


def infer_task(config: dict) -> str:
    """The task of a config: from its keys, else from the keys of its first training item."""
    if {'vqa_root', 'vg_root', 'answer_list'} & config.keys():
        return 'vqa'
    if {'det_file', 'refcoco_data', 'coco_file'} & config.keys():
        return 'grounding'
    if 'image_root' not in config:
        return 'pretrain'
    if 'k_test' in config:
        return 're'
    item = _first_item(config)
    for key, task in (('images', 'nlvr'), ('label', 've'), ('image_id', 're'), ('text', 'grounding')):
        if key in item:
            return task
    # the original NLVR.yaml has one batch_size (and eval_ema), VE.yaml batch_size_train/test
    if 'eval_ema' in config or ('batch_size' in config and 'batch_size_train' not in config):
        return 'nlvr'
    if 'batch_size_train' in config:
        return 've'
    raise DataError("cannot tell the task from the config's keys or its first training item; pass --task")


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
                dataset = split.build(config, ann_file=path, check_images=False, strict=False)
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
    parser.add_argument('--task', choices=list(TASKS), help='default: inferred from the config')
    parser.add_argument('--write-clean', metavar='OUT_DIR',
                        help='write each annotation file without its bad items to OUT_DIR')
    parser.add_argument('--workers', type=int, default=8, help='threads opening images (default 8)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        task = args.task or infer_task(config)
    except (DataError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except Exception as e:  # YAML syntax errors span several lines; keep the first
        print(f'error: {args.config}: {str(e).splitlines()[0] if str(e) else type(e).__name__}', file=sys.stderr)
        return 2
    print(f'checking the {task} data of {args.config}', file=sys.stderr)
    problems, counts = scan(config, task, workers=args.workers, progress=not args.no_progress)
    for problem in problems:
        print(problem.message)
    print(summary(problems, counts))
    if args.write_clean:
        write_clean(problems, counts, args.write_clean)
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
