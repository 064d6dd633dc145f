"""The standard VQA accuracy (dataset/vqa_eval.py) on hand-computed answers."""
import pytest

from dataset.vqa_eval import answer_accuracy, has_ground_truth, normalize_answer, vqa_accuracy


@pytest.mark.parametrize('raw, normalized', [
    ('two', '2'), ('Two', '2'), ('none', '0'), ('ten', '10'),        # number words -> digits
    ('a dog', 'dog'), ('the red one', 'red 1'), ('an apple', 'apple'),  # articles dropped
    ('yes!', 'yes'), ('yes.', 'yes'), ('what?', 'what'),             # punctuation
    ('x-ray', 'x ray'), ('red/blue', 'red blue'),                    # glued punctuation -> space
    ('red - blue', 'red blue'), ('(red)', 'red'),
    ('1,000', '1000'), ('3.5', '3.5'), ('mr. smith', 'mr smith'),      # digit comma; decimal point kept
    ('dont', "don't"), ('cant', "can't"), ('couldntve', "couldn't've"),  # contractions
    ("don't", "don't"), ('its', 'its'), ('well', 'well'),            # words left alone
    ('  Red\tcar\n', 'red car'), ('A', ''),
])
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_equivalent_spellings_score_full_marks():
    assert answer_accuracy('two', ['2'] * 10) == 1.0
    assert answer_accuracy('2', ['two'] * 10) == 1.0
    assert answer_accuracy('a dog', ['dog'] * 10) == 1.0
    assert answer_accuracy('Yes.', ['yes'] * 10) == 1.0
    assert answer_accuracy('dont know', ["don't know"] * 10) == 1.0
    assert answer_accuracy('cat', ['dog'] * 10) == 0.0


@pytest.mark.parametrize('matches, expected', [
    # leave annotator j out, score min(1, matches among the other 9 / 3), average over the 10 choices:
    (0, 0.0),
    (1, (1 * 0 + 9 * 1 / 3) / 10),        # 0.3
    (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),    # 0.6
    (3, (3 * 2 / 3 + 7 * 1) / 10),        # 0.9
    (4, 1.0), (10, 1.0),
])
def test_partial_annotator_agreement(matches, expected):
    gts = ['dog'] * matches + ['cat'] * (10 - matches)
    assert answer_accuracy('dog', gts) == pytest.approx(expected)
    assert answer_accuracy('dog', list(reversed(gts))) == pytest.approx(expected)  # order does not matter


def test_fewer_annotators_and_official_dict_format():
    assert answer_accuracy('dog', ['dog', 'dog', 'dog']) == pytest.approx(2 / 3)  # each subset has 2 of 3
    assert answer_accuracy('dog', [{'answer': 'dog', 'answer_id': i} for i in range(10)]) == 1.0


def test_official_tool_normalises_only_disagreement():
    # the official tool compares verbatim when all annotators agree (its answers are pre-normalised)
    assert answer_accuracy('two', ['2'] * 10, always_normalize=False) == 0.0
    assert answer_accuracy('two', ['2'] * 9 + ['3'], always_normalize=False) == 1.0


def test_vqa_accuracy_overall_and_per_answer_type():
    annotations = [
        {'question_id': 1, 'answer': ['yes'] * 10, 'answer_type': 'yes/no'},
        {'question_id': 2, 'answer': ['no'] * 8 + ['yes'] * 2, 'answer_type': 'yes/no'},
        {'question_id': 3, 'answer': ['2'] * 10, 'answer_type': 'number'},
        {'question_id': 4, 'answer': ['red'] * 3 + ['blue'] * 7, 'answer_type': 'other'},
    ]
    predictions = [{'question_id': 4, 'answer': 'red'}, {'question_id': 1, 'answer': 'yes'},
                   {'question_id': 2, 'answer': 'yes'}, {'question_id': 3, 'answer': 'two'}]
    result = vqa_accuracy(predictions, annotations)
    assert result['num_questions'] == 4
    assert result['overall'] == pytest.approx(100 * (1 + 0.6 + 1 + 0.9) / 4)
    assert result['per_answer_type'] == pytest.approx({'yes/no': 80.0, 'number': 100.0, 'other': 90.0})


def test_vqa_accuracy_without_types_and_missing_prediction():
    annotations = [{'question_id': 7, 'answer': ['dog'] * 10}, {'question_id': 8, 'answer': ['cat'] * 10}]
    result = vqa_accuracy([{'question_id': 7, 'answer': 'dog'}, {'question_id': 8, 'answer': 'dog'}], annotations)
    assert result['overall'] == pytest.approx(50.0) and result['per_answer_type'] == {}
    with pytest.raises(ValueError, match='no prediction for question_id 8'):
        vqa_accuracy([{'question_id': 7, 'answer': 'dog'}], annotations)
    assert has_ground_truth(annotations)
    assert not has_ground_truth([{'question_id': 9, 'question': 'what?'}])
