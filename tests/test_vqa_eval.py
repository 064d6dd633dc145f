"""dataset/vqa_eval.py gives the official VQA evaluation tool's numbers: each of the tool's rules and
quirks on hand-computed answers."""
import pytest

from dataset.vqa_eval import CONTRACTIONS, answer_accuracy, has_ground_truth, normalize_answer, vqa_accuracy

DISAGREE = ['dog'] * 9 + ['cat']  # annotators who disagree: both sides are normalised


@pytest.mark.parametrize('raw, normalized', [
    ('two', '2'), ('Two', '2'), ('none', '0'), ('ten', '10'), ('eleven', 'eleven'),  # number words -> digits
    ('a dog', 'dog'), ('the two', '2'), ('an apple', 'apple'), ('A', ''),        # articles dropped
    ('yes!', 'yes'), ('yes.', 'yes'), ('what?', 'what'),                         # punctuation
    ('x-ray', 'x ray'), ('red/blue', 'red blue'),       # a mark that never touches a space -> a space
    ('red - blue', 'red blue'), ('(red)', 'red'),       # one that touches a space somewhere: deleted
    ('a;b ;c', 'ab c'),                                 # ... everywhere, the glued one too
    ('1,000', '1000'), ('x-ray 1,2', 'xray 12'),        # a digit,digit comma: every mark deleted
    ('3:30', '3:30'), ("don't", "don't"),               # colon and apostrophe are not punctuation
    ('3.5', '3.5'), ('.5', '.5'), ('mr. smith', 'mr smith'),
    ('5.x', '5x'),                                      # the period rule is "not followed by a digit"
    ('x' + '.' * 35, 'x...'),                           # only the first 32 periods go
    ('dont', "don't"), ('whats up', "what's up"), ('cant', "can't"),  # contractions
    ("somebody'd", 'somebodyd'),                        # the table's odd entry, as it is
    ('im', 'im'), ('Ive', 'ive'),                       # capitalised keys never match
    ('couldntve', 'couldntve'), ('its', 'its'),         # not in the table
])
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_contraction_table_size():
    assert len(CONTRACTIONS) == 120 and CONTRACTIONS['yall\'d\'ve'] == "y'all'd've"


def test_answers_are_normalised_only_when_the_annotators_disagree():
    # all ten agree: verbatim comparison, case and punctuation included
    assert answer_accuracy('yes', ['yes'] * 10) == 1.0
    assert answer_accuracy('Yes', ['yes'] * 10) == 0.0
    assert answer_accuracy('yes.', ['yes'] * 10) == 0.0
    assert answer_accuracy('two', ['2'] * 10) == 0.0
    assert answer_accuracy(' yes\n', ['yes\t'] * 10) == 1.0  # whitespace is stripped in any case
    # they disagree: both sides normalised
    assert answer_accuracy('Yes.', ['yes'] * 9 + ['no']) == 1.0
    assert answer_accuracy('two', ['2'] * 9 + ['3']) == 1.0
    assert answer_accuracy('A Dog!', DISAGREE) == 1.0
    # the named alternative normalises every question
    assert answer_accuracy('Yes', ['yes'] * 10, normalization='always') == 1.0
    assert answer_accuracy('two', ['2'] * 10, normalization='always') == 1.0
    with pytest.raises(ValueError, match="normalization must be one of official, always, got 'pil'"):
        answer_accuracy('yes', ['yes'], normalization='pil')


@pytest.mark.parametrize('matches, expected', [
    # leave annotator j out, score min(1, matches among the other 9 / 3), average over the 10 choices
    (0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0),
])
def test_leave_one_out_agreement(matches, expected):
    gts = ['dog'] * matches + ['cat'] * (10 - matches)
    assert answer_accuracy('dog', gts) == pytest.approx(expected, abs=1e-15)
    assert answer_accuracy('dog', list(reversed(gts))) == pytest.approx(expected, abs=1e-15)
    per_question = vqa_accuracy([{'question_id': 1, 'answer': 'dog'}],
                                [{'question_id': 1, 'answer': gts}])['per_question']
    assert per_question == {1: round(100 * expected, 2)}


def test_official_answer_dicts_are_left_out_by_equality():
    with_ids = [{'answer': 'dog', 'answer_id': i + 1, 'answer_confidence': 'yes'} for i in range(10)]
    assert answer_accuracy('dog', with_ids) == 1.0
    # the tool leaves out every dict equal to the left-out one: without answer_ids, all ten
    assert answer_accuracy('dog', [{'answer': 'dog'}] * 10) == 0.0
    assert answer_accuracy('dog', ['dog', 'dog', 'dog']) == pytest.approx(2 / 3)  # strings: one per annotator


def test_overall_per_answer_type_and_per_question_type_with_rounding():
    annotations = [
        {'question_id': 1, 'answer': ['yes'] * 10, 'answer_type': 'yes/no', 'question_type': 'is the'},
        {'question_id': 2, 'answer': ['no'] * 8 + ['yes'] * 2, 'answer_type': 'yes/no', 'question_type': 'is the'},
        {'question_id': 3, 'answer': ['2'] * 10, 'answer_type': 'number', 'question_type': 'how many'},
        {'question_id': 4, 'answer': ['red'] * 3 + ['blue'] * 7, 'answer_type': 'other', 'question_type': 'what color'},
        {'question_id': 5, 'answer': ['blue'] * 10, 'answer_type': 'other', 'question_type': 'what color'},
        {'question_id': 6, 'answer': ['2'] * 9 + ['3'], 'answer_type': 'number', 'question_type': 'how many'},
        {'question_id': 1, 'answer': ['no'] * 10, 'answer_type': 'yes/no'},  # repeated: scored once
    ]
    predictions = [{'question_id': 4, 'answer': 'red'}, {'question_id': 1, 'answer': 'yes'},
                   {'question_id': 2, 'answer': 'Yes'}, {'question_id': 3, 'answer': 'two'},
                   {'question_id': 5, 'answer': 'Blue'}, {'question_id': 6, 'answer': 'two'}]
    result = vqa_accuracy(predictions, annotations)
    # per question: 1, 0.6, 0 (verbatim "two" vs "2"), 0.9, 0 (verbatim "Blue"), 1 (normalised)
    assert result['per_question'] == {1: 100.0, 2: 60.0, 3: 0.0, 4: 90.0, 5: 0.0, 6: 100.0}
    assert result['num_questions'] == 6
    assert result['overall'] == 58.33                   # round(100 * 3.5 / 6, 2)
    assert result['per_answer_type'] == {'number': 50.0, 'other': 45.0, 'yes/no': 80.0}
    assert result['per_question_type'] == {'how many': 50.0, 'is the': 80.0, 'what color': 45.0}
    always = vqa_accuracy(predictions, annotations, normalization='always')
    assert always['overall'] == 91.67 and always['per_question'][5] == 100.0  # round(100 * 5.5 / 6, 2)


def test_vqa_accuracy_without_types_and_missing_prediction():
    annotations = [{'question_id': 7, 'answer': ['dog'] * 10}, {'question_id': 8, 'answer': ['cat'] * 10}]
    result = vqa_accuracy([{'question_id': 7, 'answer': 'dog'}, {'question_id': 8, 'answer': 'dog'}], annotations)
    assert result['overall'] == 50.0 and result['per_answer_type'] == result['per_question_type'] == {}
    with pytest.raises(ValueError, match='no prediction for question_id 8'):
        vqa_accuracy([{'question_id': 7, 'answer': 'dog'}], annotations)
    assert has_ground_truth(annotations)
    assert not has_ground_truth([{'question_id': 9, 'question': 'what?'}])


def test_vqa_script_rejects_an_unknown_normalization(demo_config, tmp_path, capsys):
    import engine
    import VQA
    config = demo_config('VQA', vqa_normalization='lenient')
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as exit_info:
        engine.launch(VQA.main, VQA.get_parser(), ['--config', config, '--output_dir', str(out), '--device', 'cpu'])
    assert exit_info.value.code == 2 and not out.exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {config}: vqa_normalization: expected one of official, always, got 'lenient'"]
