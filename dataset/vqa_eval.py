"""VQA accuracy exactly as the official VQA evaluation tool computes it (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py), for scoring answers locally when the test items
carry their annotators' answers. Written from the tool's behaviour, quirks included, so that the
number VQA.py logs is the number the tool (and the evaluation server) gives for the same answers.

Per question (`answer_accuracy`):

1. Line breaks and tabs become spaces and both ends are stripped, in the prediction and in every
   annotator answer.
2. Only when the annotators disagree (more than one distinct answer after step 1) are the
   prediction and the annotator answers normalised (`normalize_answer`); when all annotators give
   the same answer it is compared verbatim, case included: the released answers are already
   normalised, so "Yes" or "yes." against ten "yes" scores 0.
3. Leaving out each annotator in turn, the prediction scores min(1, matches among the others / 3);
   the question's accuracy is the mean of these (1 of 10 matching gives 0.3, 2 give 0.6, 3 give
   0.9, 4 or more 1). "The others" are the answers that differ from the left-out one as objects:
   the official format's answer dicts each carry their own `answer_id`, so that is exactly one
   left out; plain strings here stand for distinct annotators, so the one at that position.

The normalisation (`normalize_answer`) is two passes:

* punctuation: if the text contains a digit-comma-digit ("1,000"), every mark in PUNCTUATION is
  deleted; otherwise each mark is deleted when it touches a space somewhere in the original
  text ("red - blue") and replaced by a space when it never does ("x-ray" -> "x ray"). The
  apostrophe, colon and period are not in the list. Then every period not followed by a digit is
  deleted ("3.5" stays, ".5" stays, "mr. smith" -> "mr smith", "5.x" -> "5x"), but only the first 32:
  the tool passes `re.UNICODE` (= 32) where `re.sub` takes its count.
* words: lower-cased and split on whitespace; number words zero..ten (and "none") become digits,
  then the articles a/an/the are dropped, then each word found in the tool's contraction table is
  replaced by its entry ("dont" -> "don't"). The table is used as it is: its few odd entries
  ("somebody'd" -> "somebodyd") apply, and its capitalised keys ("Im", "Ive") never match the
  lower-cased words.

Over questions (`vqa_accuracy`): overall, per answer type and per question type, each
round(100 * mean, 2) as the tool reports them, and each question's round(100 * accuracy, 2).

`normalization='always'` (a named alternative, not the tool's number) normalises prediction and
annotator answers for every question, for annotations that are not pre-normalised.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

NORMALIZATIONS = ('official', 'always')

NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = {'a', 'an', 'the'}
# in the tool's order: each is handled on its own, deleted or turned into a space
PUNCTUATION = [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
               '?', '!']
_DIGIT_COMMA_DIGIT = re.compile(r'\d,\d')
# The tool's pattern starts with a lookahead "(?!<=\d)" meant as a lookbehind; before a period it
# always holds, so the pattern is: a period not followed by a digit.
_PERIOD = re.compile(r'\.(?!\d)')
_PERIODS_REMOVED = int(re.UNICODE)  # 32: the count the tool passes to re.sub

# The tool's contraction table, "spelling:written" (straight apostrophes), as it is.
CONTRACTIONS = dict(pair.split(':') for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've
mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've
oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't
shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd
someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's
somethingd:something'd somethingd've:something'd've something'dve:something'd've
somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've
therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll
theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd
wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
you'dve:you'd've youll:you'll youre:you're youve:you've
""".split())


def _strip_whitespace(answer: str) -> str:
    return answer.replace('\n', ' ').replace('\t', ' ').strip()


def _process_punctuation(text: str) -> str:
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # the test looks at the text as it came in, not at the partly processed one
        touches_space = mark + ' ' in text or ' ' + mark in text
        out = out.replace(mark, '' if delete_all or touches_space else ' ')
    return _PERIOD.sub('', out, count=_PERIODS_REMOVED)


def _process_words(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return ' '.join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The tool's normalisation of one answer: "Two dogs." -> "2 dogs", "a dog" -> "dog",
    "dont know" -> "don't know". (It does not strip line breaks; `answer_accuracy` does that first.)"""
    return _process_words(_process_punctuation(answer))


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"VQA answer normalization must be one of {', '.join(NORMALIZATIONS)}, "
                         f'got {normalization!r}')


def answer_accuracy(prediction: str, gt_answers: Sequence[str | dict], normalization: str = 'official') -> float:
    """Accuracy in [0, 1] of one predicted answer against its annotators' answers: strings (one
    per annotator) or the official format's dicts with an 'answer' key."""
    _check_normalization(normalization)
    if not gt_answers:
        raise ValueError('no ground-truth answers to score against')
    if all(isinstance(a, dict) for a in gt_answers):
        records = [dict(a, answer=_strip_whitespace(a['answer'])) for a in gt_answers]
    else:
        # one record per position: distinct annotators even when their answers are equal
        records = [{'answer': _strip_whitespace(a['answer'] if isinstance(a, dict) else a), 'annotator': i}
                   for i, a in enumerate(gt_answers)]
    prediction = _strip_whitespace(prediction)
    if normalization == 'always' or len({r['answer'] for r in records}) > 1:
        for record in records:
            record['answer'] = normalize_answer(record['answer'])
        prediction = normalize_answer(prediction)
    scores = []
    for left_out in records:
        matches = sum(1 for r in records if r != left_out and r['answer'] == prediction)
        scores.append(min(1, float(matches) / 3))
    return float(sum(scores)) / len(scores)


def _percent(scores: Sequence[float]) -> float:
    return round(100 * float(sum(scores)) / len(scores), 2)


def vqa_accuracy(predictions: Sequence[dict], annotations: Sequence[dict], normalization: str = 'official') -> dict:
    """VQA accuracy in percent over the annotated questions, as the official tool reports it.

    Args:
        predictions: [{'question_id', 'answer'}] (a VQA result file).
        annotations: [{'question_id', 'answer': [annotator answers], optional 'answer_type' and
            'question_type'}] (test items that carry their ground truth); a repeated question_id
            is scored once.
        normalization: 'official' (the tool's number) or 'always' (see the module docstring).

    Returns:
        {'overall': %, 'per_answer_type': {type: %}, 'per_question_type': {type: %} (empty
         without the keys), 'per_question': {question_id: %}, 'num_questions': n}, every
         percentage round(100 * x, 2). A question without a prediction raises ValueError.
    """
    _check_normalization(normalization)
    answers = {int(p['question_id']): p['answer'] for p in predictions}
    scores, per_question = [], {}
    by_answer_type, by_question_type = defaultdict(list), defaultdict(list)
    for item in annotations:
        question_id = int(item['question_id'])
        if question_id in per_question:
            continue
        if question_id not in answers:
            raise ValueError(f'no prediction for question_id {question_id}')
        score = answer_accuracy(answers[question_id], item['answer'], normalization)
        scores.append(score)
        per_question[question_id] = round(100 * score, 2)
        if item.get('answer_type') is not None:
            by_answer_type[item['answer_type']].append(score)
        if item.get('question_type') is not None:
            by_question_type[item['question_type']].append(score)
    if not scores:
        raise ValueError('no annotated questions to score')
    return {'overall': _percent(scores),
            'per_answer_type': {t: _percent(s) for t, s in sorted(by_answer_type.items())},
            'per_question_type': {t: _percent(s) for t, s in sorted(by_question_type.items())},
            'per_question': per_question,
            'num_questions': len(scores)}


def has_ground_truth(annotations: Sequence[dict]) -> bool:
    """True when every item carries a non-empty list of annotator answers."""
    return bool(annotations) and all(isinstance(item.get('answer'), list) and item['answer'] for item in annotations)
