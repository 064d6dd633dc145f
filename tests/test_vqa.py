"""VQA.py end to end on the demo world: a short fine-tuning from the demo pre-training checkpoint
beats the majority answer, the result file holds every test question once in test-file order, and
`--evaluate` with two gloo processes writes the same file and the same accuracy as the
one-process run at the end of fine-tuning."""
import collections
import json
import os

import pytest
import torch

from conftest import ROOT, _merge, _relocate, run_script
from dataset.vqa_eval import vqa_accuracy

EPOCHS = 3  # the demo config has 4; 3 already beat the baseline by far


def write_demo_config(name, world, path, **overrides):
    """configs/demo/<name>.yaml pointed at `world`, with overrides (demo_config for any fixture scope)."""
    from ruamel.yaml import YAML
    with open(os.path.join(ROOT, 'configs', 'demo', f'{name}.yaml')) as f:
        config = {k: _relocate(v, world) for k, v in YAML(typ='safe').load(f).items()}
    config['bert_config'] = os.path.join(ROOT, config['bert_config'])
    _merge(config, overrides)
    with open(path, 'w') as f:
        YAML(typ='safe').dump(config, f)
    return str(path)


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def read_log(output_dir):
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def typed_test_file(world, path):
    """vqa_test.json with an odd number of questions (a padded sampler would answer one twice with two
    processes) and the official answer types, so that the accuracy is also broken down by type."""
    from dataset.toy import ANSWER_TYPES
    answer_type = {a: {'yesno': 'yes/no', 'count': 'number'}.get(t, 'other')
                   for t, answers in ANSWER_TYPES.items() for a in answers}
    items = read_json(os.path.join(world, 'vqa_test.json'))
    items = [dict(item, answer_type=answer_type[collections.Counter(item['answer']).most_common(1)[0][0]])
             for item in items[:len(items) - 1 + len(items) % 2]]
    with open(path, 'w') as f:
        json.dump(items, f)
    return items


@pytest.fixture(scope='module')
def vqa(pretrained_demo, tmp_path_factory):
    """One fine-tuning run (one process), then `--evaluate` of its last checkpoint with two processes."""
    base = tmp_path_factory.mktemp('vqa')
    world = pretrained_demo['world']
    test = typed_test_file(world, base / 'vqa_test_typed.json')
    config = write_demo_config('VQA', world, base / 'VQA.yaml', num_workers=0, print_freq=50, topk_answers=3,
                               test_file=[str(base / 'vqa_test_typed.json')], schedular={'epochs': EPOCHS})
    finetune = base / 'finetune'
    assert_ok(run_script('VQA.py', '--config', config, '--checkpoint', pretrained_demo['checkpoint'],
                         '--output_dir', finetune, '--device', 'cpu'))
    evaluate = base / 'evaluate'
    result = run_script('VQA.py', '--config', config, '--checkpoint', finetune / f'checkpoint_{EPOCHS - 1:02d}.pth',
                        '--output_dir', evaluate, '--device', 'cpu', '--evaluate', nproc=2)
    assert_ok(result)
    return {'world': world, 'finetune': finetune, 'evaluate': evaluate, 'test': test,
            'evaluate_output': result.stdout + result.stderr,
            'answer_list': read_json(os.path.join(world, 'answer_list.json'))}


def test_fine_tuning_beats_the_majority_answer(vqa):
    counts = collections.Counter(answer for item in vqa['test'] for answer in item['answer'])
    majority = counts.most_common(1)[0][0]
    baseline = vqa_accuracy([{'question_id': item['question_id'], 'answer': majority} for item in vqa['test']],
                            vqa['test'])['overall']
    log = read_log(vqa['finetune'])
    accuracy = log[-1]['vqa_acc']
    # the logged accuracies are those of the result file, overall and per answer type
    results = read_json(vqa['finetune'] / 'result' / f'vqa_result_epoch{EPOCHS - 1}.json')
    expected = vqa_accuracy(results, vqa['test'])
    assert log[-1] == {'vqa_acc': round(expected['overall'], 2), 'epoch': EPOCHS - 1,
                       **{f'vqa_acc_{t}': round(a, 2) for t, a in expected['per_answer_type'].items()}}
    assert set(expected['per_answer_type']) == {'yes/no', 'number', 'other'}
    assert accuracy > baseline + 15, f'VQA accuracy {accuracy:.2f} vs majority answer "{majority}" {baseline:.2f}'


def test_training_log_and_checkpoints(vqa):
    log = read_log(vqa['finetune'])
    assert [line['epoch'] for line in log] == list(range(EPOCHS)) + [EPOCHS - 1]
    assert all({'train_lr', 'train_loss'} <= set(line) for line in log[:EPOCHS])
    assert log[EPOCHS - 1]['train_loss'] < log[0]['train_loss'] - 1.0
    assert {'vqa_acc', 'vqa_acc_yes/no', 'vqa_acc_number', 'vqa_acc_other'} <= set(log[-1])
    names = set(os.listdir(vqa['finetune']))
    assert {f'checkpoint_{e:02d}.pth' for e in range(EPOCHS)} <= names
    checkpoint = torch.load(vqa['finetune'] / f'checkpoint_{EPOCHS - 1:02d}.pth', map_location='cpu',
                            weights_only=False)
    assert checkpoint['epoch'] == EPOCHS - 1 and 'text_decoder_m.cls.predictions.bias' in checkpoint['model']


def test_result_file_has_each_question_once_in_test_order(vqa):
    results = read_json(vqa['finetune'] / 'result' / f'vqa_result_epoch{EPOCHS - 1}.json')
    assert [r['question_id'] for r in results] == [item['question_id'] for item in vqa['test']]
    assert all(set(r) == {'question_id', 'answer'} and r['answer'] in vqa['answer_list'] for r in results)
    top = read_json(vqa['finetune'] / 'result' / f'vqa_result_epoch{EPOCHS - 1}_top3.json')
    assert [t['question_id'] for t in top] == [r['question_id'] for r in results]
    for t, r in zip(top, results):
        assert len(t['answers']) == 3 and len(set(t['answers'])) == 3 and t['answers'][0] == r['answer']
        assert t['probs'] == sorted(t['probs'], reverse=True) and 0 < sum(t['probs']) <= 1 + 1e-6


def test_two_process_evaluation_equals_the_one_process_run(vqa):
    result_dir = vqa['evaluate'] / 'result'
    one_process = read_json(vqa['finetune'] / 'result' / f'vqa_result_epoch{EPOCHS - 1}.json')
    two_processes = read_json(result_dir / 'vqa_result_epoch0.json')
    assert two_processes == one_process
    # each rank answered its own share: together every question exactly once
    shares = [read_json(result_dir / f'vqa_result_epoch0_rank{r}.json') for r in (0, 1)]
    ids = [r['question_id'] for share in shares for r in share]
    assert len(ids) == len(set(ids)) == len(vqa['test']) and all(shares)
    assert read_log(vqa['evaluate']) == [dict(read_log(vqa['finetune'])[-1], epoch=0)]
    assert len(vqa['test']) % 2 == 1
    assert 'process 1 of 2 on cpu (gloo)' in vqa['evaluate_output']


def test_pretraining_checkpoint_converts_to_the_vqa_layout(pretrained_demo):
    """The demo pre-training checkpoint, converted, loads strictly into the demo VQA model: the encoder
    gets every BERT layer and the decoder the fusion layers, the embeddings and the MLM head."""
    from configuration import load_yaml
    from models.checkpoint import pretrain_to_vqa, read_state_dict
    from models.model_vqa import ALBEF
    from models.tokenization_bert import BertTokenizer

    config = load_yaml(os.path.join(ROOT, 'configs', 'demo', 'VQA.yaml'))
    config['bert_config'] = os.path.join(ROOT, config['bert_config'])
    pretrained = read_state_dict(pretrained_demo['checkpoint'])
    model = ALBEF(config=config, tokenizer=BertTokenizer.from_pretrained(pretrained_demo['config']['text_encoder']))
    converted = pretrain_to_vqa(pretrained)
    own = model.state_dict()
    unused = {k.split('.')[0] for k in converted if k not in own}
    assert unused == {'vision_proj', 'vision_proj_m', 'text_proj', 'text_proj_m', 'temp', 'itm_head', 'image_queue',
                      'text_queue', 'queue_ptr'}
    model.load_state_dict({k: v for k, v in converted.items() if k in own}, strict=True)
    fusion_layer = model.text_encoder.config.fusion_layer
    for i, layer in enumerate(model.text_decoder.bert.encoder.layer):
        source = f'text_encoder.bert.encoder.layer.{fusion_layer + i}.crossattention.self.value.weight'
        assert torch.equal(layer.crossattention.self.value.weight, pretrained[source])
    assert torch.equal(model.text_encoder.encoder.layer[0].output.dense.weight,
                       pretrained['text_encoder.bert.encoder.layer.0.output.dense.weight'])
    assert torch.equal(model.text_decoder_m.cls.predictions.bias, pretrained['text_encoder_m.cls.predictions.bias'])
