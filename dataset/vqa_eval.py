"""The standard VQA accuracy (VQA v2 evaluation), for scoring answers locally when the test items
carry their annotators' answers.

An answer is compared with the (usually 10) human answers after the usual normalisation: line
breaks and tabs become spaces, punctuation is removed or turned into a space, periods that are not
decimal points are dropped, everything is lower-cased, number words become digits ("two" -> "2"),
the articles a/an/the are removed and contractions get their apostrophe back ("dont" -> "don't").
Its accuracy is the mean, over the 10 subsets that leave out one annotator, of
min(1, #matching answers among the other 9 / 3): 1 of 10 matching gives 0.3, 2 give 0.6, 3 give
0.9 and 4 or more give 1.

Difference from the official tool (on purpose): it normalises only when the annotators disagree,
since the released annotations are already normalised; here both sides are always normalised
(`vqa_accuracy(..., always_normalize=False)` gives the official behaviour).
"""
from __future__ import annotations

import itertools
import re
from collections import defaultdict
from typing import Iterable, Sequence

NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = {'a', 'an', 'the'}

# Punctuation removed (when it touches a space, or the text has a digit,digit comma) or else
# turned into a space. The apostrophe is kept, so that contractions survive.
PUNCTUATION = [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
               '?', '!']
_PERIOD = re.compile(r'(?<!\d)\.(?!\d)')  # a period that is not a decimal point
_DIGIT_COMMA_DIGIT = re.compile(r'\d,\d')

# English contractions in their written form; the forms typed without (some of) their apostrophes
# are derived from these.
CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd she'd've
she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd
someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd we'd've we're we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll
why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've
""".split()
# Spellings without the apostrophe that are words of their own ("its", "well", "were"): left alone.
_REAL_WORDS = {'id', 'im', 'its', 'ill', 'well', 'were', 'wed', 'hell', 'shell', 'shed'}


def _contraction_map(contractions: Iterable[str]) -> dict[str, str]:
    """Every spelling of each contraction with one or more of its apostrophes left out -> the
    written form ("dont" -> "don't", "couldntve" and "couldn'tve" -> "couldn't've")."""
    mapping = {}
    for word in contractions:
        pieces = word.split("'")
        for kept in itertools.product((True, False), repeat=len(pieces) - 1):
            if all(kept):
                continue
            spelling = pieces[0] + ''.join(("'" if keep else '') + piece for keep, piece in zip(kept, pieces[1:]))
            if spelling not in _REAL_WORDS:
                mapping[spelling] = word
    return mapping


CONTRACTION_MAP = _contraction_map(CONTRACTIONS)


def _strip_whitespace(answer: str) -> str:
    return answer.replace('\n', ' ').replace('\t', ' ').strip()


def _process_punctuation(text: str) -> str:
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if (p + ' ' in text or ' ' + p in text) or has_digit_comma:
            text = text.replace(p, '')
        else:
            text = text.replace(p, ' ')
    return _PERIOD.sub('', text)


def _process_words(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTION_MAP.get(word, word) for word in words if word not in ARTICLES]
    return ' '.join(words)


def normalize_answer(answer: str) -> str:
    """The normalised form in which answers are compared: "Two dogs." -> "2 dogs",
    "a dog" -> "dog", "dont know" -> "don't know"."""
    return _process_words(_process_punctuation(_strip_whitespace(answer)))


def _answer_text(answer: str | dict) -> str:
    return answer['answer'] if isinstance(answer, dict) else answer


def answer_accuracy(prediction: str, gt_answers: Sequence[str | dict], always_normalize: bool = True) -> float:
    """Accuracy in [0, 1] of one predicted answer against its annotators' answers (strings, or
    the official format's dicts with an 'answer' key)."""
    gts = [_strip_whitespace(_answer_text(a)) for a in gt_answers]
    if not gts:
        raise ValueError('no ground-truth answers to score against')
    prediction = _strip_whitespace(prediction)
    if always_normalize or len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        prediction = normalize_answer(prediction)
    matches = [gt == prediction for gt in gts]
    total = sum(matches)
    # leave annotator j out: the others match (total - matches[j]) times
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


def vqa_accuracy(predictions: Sequence[dict], annotations: Sequence[dict], always_normalize: bool = True) -> dict:
    """VQA accuracy in percent over the annotated questions.

    Args:
        predictions: [{'question_id', 'answer'}] (a VQA result file).
        annotations: [{'question_id', 'answer': [annotator answers], optional 'answer_type'}]
            (test items that carry their ground truth).

    Returns:
        {'overall': %, 'per_answer_type': {type: %} (empty without 'answer_type'),
         'num_questions': n}. A question without a prediction raises ValueError.
    """
    answers = {int(p['question_id']): p['answer'] for p in predictions}
    scores, by_type = [], defaultdict(list)
    seen = set()
    for item in annotations:
        question_id = int(item['question_id'])
        if question_id in seen:
            continue
        seen.add(question_id)
        if question_id not in answers:
            raise ValueError(f'no prediction for question_id {question_id}')
        score = answer_accuracy(answers[question_id], item['answer'], always_normalize)
        scores.append(score)
        if item.get('answer_type') is not None:
            by_type[item['answer_type']].append(score)
    if not scores:
        raise ValueError('no annotated questions to score')
    return {'overall': 100 * sum(scores) / len(scores),
            'per_answer_type': {t: 100 * sum(s) / len(s) for t, s in sorted(by_type.items())},
            'num_questions': len(scores)}


def has_ground_truth(annotations: Sequence[dict]) -> bool:
    """True when every item carries a non-empty list of annotator answers."""
    return bool(annotations) and all(isinstance(item.get('answer'), list) and item['answer'] for item in annotations)
