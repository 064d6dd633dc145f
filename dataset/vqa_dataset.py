"""VQA v2 (+ Visual Genome QA) dataset (docs/DESIGN.md, "Datasets and annotation formats")."""
from __future__ import annotations

import os
from typing import Callable, Sequence

from .base import AnnotationDataset, DataError, Problem, read_json_list
from .utils import pre_question


class vqa_dataset(AnnotationDataset):
    """Items {'dataset': 'vqa' or 'vg', 'image', 'question'} plus 'answer' (train) or
    'question_id' (test). 'vqa' images are under vqa_root, 'vg' images under vg_root.

    Returns (image, question, answers, weights) for split 'train' and (image, question,
    question_id) for split 'test'. At test time questions keep up to 50 words and `answer_list`
    (a JSON list of candidate answers) is loaded into `self.answer_list`.
    """

    def __init__(self, ann_file: str | Sequence[str], transform: Callable | None, vqa_root: str,
                 vg_root: str, eos: str = '[SEP]', split: str = 'train', max_ques_words: int = 30,
                 answer_list: str = '', **options: bool) -> None:
        if split not in ('train', 'test'):
            raise ValueError(f"vqa_dataset split must be 'train' or 'test', got {split!r}")
        self.vqa_root = vqa_root
        self.vg_root = vg_root
        self.eos = eos
        self.split = split
        self.max_ques_words = 50 if split == 'test' else max_ques_words  # Parity: 50 at test time
        super().__init__(ann_file, transform, **options)
        if split == 'test':
            self.answer_list = self._read_answer_list(answer_list)

    def _read_answer_list(self, path: str) -> list[str]:
        try:
            answers = read_json_list(path)
        except DataError as e:
            self.report(Problem('file', path, None, str(e)))
            return []
        for i, answer in enumerate(answers):
            if not isinstance(answer, str):
                self.report(Problem('item', path, i, f'{path}: item {i} is not a string'))
                return []
        return answers

    def required_keys(self, item: dict) -> tuple[str, ...]:
        last = 'answer' if self.split == 'train' else 'question_id'
        return ('dataset', 'image', 'question', last)

    def item_problem(self, item: dict) -> str | None:
        source = item['dataset']
        if source not in ('vqa', 'vg'):
            return f"has dataset {source!r} (expected 'vqa' or 'vg')"
        if self.split == 'train':
            if source == 'vqa' and not (isinstance(item['answer'], list) and item['answer']):
                return f"has 'answer' {item['answer']!r} (expected a non-empty list for dataset 'vqa')"
            if source == 'vg' and not isinstance(item['answer'], str):
                return f"has 'answer' {item['answer']!r} (expected a string for dataset 'vg')"
        return None

    def image_paths(self, item: dict) -> list[str]:
        root = self.vqa_root if item['dataset'] == 'vqa' else self.vg_root
        return [os.path.join(root, item['image'])]

    def get_item(self, index: int) -> tuple:
        ann = self.ann[index]
        image = self.apply_transform(self.load_image(self.image_paths(ann)[0], index))
        question = pre_question(ann['question'], self.max_ques_words)
        if self.split == 'test':
            return image, question, ann['question_id']
        answers, weights = answer_weights(ann)
        return image, question, [answer + self.eos for answer in answers], weights


def answer_weights(ann: dict) -> tuple[list[str], list[float]]:
    """Distinct answers in order of first occurrence and their weights.

    'vqa': each occurrence adds 1/len(answers) in Python floats (Parity: 3 of 10 gives
    0.30000000000000004, not 0.3). 'vg': the single answer with weight 0.5.
    """
    if ann['dataset'] == 'vg':
        return [ann['answer']], [0.5]
    share = 1 / len(ann['answer'])
    weights: dict[str, float] = {}
    for answer in ann['answer']:
        weights[answer] = weights[answer] + share if answer in weights else share
    return list(weights), list(weights.values())
