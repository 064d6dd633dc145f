"""Visual question answering on VQA v2 (docs/DESIGN.md, "VQA (VQA.py)"):
fine-tune the answer decoder with momentum
distillation, then answer every test question by ranking the candidates of `answer_list`.

    python VQA.py --config configs/VQA.yaml --checkpoint ALBEF.pth --output_dir output/VQA
    python VQA.py --config configs/VQA.yaml --checkpoint vqa.pth --output_dir output/VQA --evaluate

The answers go to output_dir/result/vqa_result_epoch<N>.json ([{"question_id", "answer"}], each
test question once, in test-file order) for the evaluation server. When the test items carry their
annotators' answers, the VQA accuracy is also computed and logged (`vqa_acc`, in percent): the
official VQA evaluation tool's number, computed locally by dataset/vqa_eval.py (config key
`vqa_normalization: always` normalises every answer instead, for annotations that are not
pre-normalised; that is not the official number).
With `topk_answers: K` in the config, the K best answers of each question and their
probabilities go to vqa_result_epoch<N>_top<K>.json as well.
"""
import configuration
import tasks

TASK = tasks.VQA  # its config keys and their checks, datasets, model: tasks.py
configuration.precheck(__name__, TASK)  # config mistakes in a second, before torch loads

import json
import os

import torch

import engine
import utils
from dataset.utils import collect_result
from dataset.vqa_eval import NORMALIZATIONS, has_ground_truth, vqa_accuracy
from models.model_vqa import ALBEF


def train_step(model, batch, alpha, run, update_momentum=True):
    batch = batch.to(run.device)  # questions and answers tokenised by the loader workers (dataset.VQACollate)
    return {'loss': model(batch.image, batch.text, batch.answer, train=True, alpha=alpha, k=batch.k,
                          weights=batch.weights, update_momentum=update_momentum)}


@torch.no_grad()
def evaluation(model, data_loader, tokenizer, device, config):
    """This rank's answers: [{'question_id', 'answer'}], plus 'topk': [(answer, probability), ...]
    with the config key `topk_answers`."""
    model.eval()
    answer_list = data_loader.dataset.answer_list
    answer_input = tokenizer([a + config['eos'] for a in answer_list], padding='longest',
                             return_tensors='pt').to(device)
    k = min(config['k_test'], len(answer_list))
    result = []
    for batch in data_loader:
        batch = batch.to(device)  # questions tokenised by the loader workers (dataset.VQACollate)
        topk_ids, topk_probs = model(batch.image, batch.text, answer_input, train=False, k=k)
        for qid, ids, probs in zip(batch.ids, topk_ids.tolist(), topk_probs.tolist()):
            # re-sorted by probability: the first candidate is the answer
            result.append({'question_id': int(qid), 'answer': answer_list[ids[0]]})
            if config.get('topk_answers'):
                result[-1]['topk'] = [(answer_list[i], p) for i, p in zip(ids, probs)]
    return result


def in_test_order(results, dataset):
    """All ranks' answers, each question once, in the order of the test file."""
    order = {}
    for item in dataset.ann:
        order.setdefault(int(item['question_id']), len(order))
    unique = {r['question_id']: r for r in results}
    return [unique[qid] for qid in sorted(unique, key=order.__getitem__)]


def write_results(run, results, epoch, topk):
    """vqa_result_epoch<N>.json (and the top-k file); returns the path of the first."""
    result_dir = run.path('result')
    path = os.path.join(result_dir, f'vqa_result_epoch{epoch}.json')
    with open(path, 'w') as f:
        json.dump([{'question_id': r['question_id'], 'answer': r['answer']} for r in results], f)
    if topk:
        with open(os.path.join(result_dir, f'vqa_result_epoch{epoch}_top{topk}.json'), 'w') as f:
            json.dump([{'question_id': r['question_id'], 'answers': [a for a, _ in r['topk'][:topk]],
                        'probs': [p for _, p in r['topk'][:topk]]} for r in results], f)
    utils.print0(f'result file saved to {path}')
    return path


def main(args):
    run = engine.setup(args, TASK)
    config = run.config
    normalization = config.get('vqa_normalization', 'official')
    if normalization not in NORMALIZATIONS:
        raise engine.ConfigError(f"{args.config}: vqa_normalization must be one of {', '.join(NORMALIZATIONS)}, "
                                 f'got {normalization!r}')

    utils.print0('Creating VQA datasets')
    train_loader, test_loader = engine.task_loaders(run, TASK, config['batch_size_train'], config['batch_size_test'])
    test_dataset = test_loader.dataset

    utils.print0('Creating model')
    text_decoder = (args.text_decoder or config['text_encoder']) if engine.bert_weights(config) else None
    training = engine.prepare(run, ALBEF(config=config, text_encoder=engine.bert_weights(config),
                                         text_decoder=text_decoder, tokenizer=run.tokenizer))
    if not args.evaluate:
        engine.fit(run, training, train_loader, train_step, alpha_ramp=config['warm_up'])
    last_epoch = 0 if args.evaluate else config['schedular']['epochs'] - 1

    utils.print0('Answering the test questions')
    results = evaluation(training.module, test_loader, run.tokenizer, run.device, config)
    results = collect_result(results, run.path('result'), f'vqa_result_epoch{last_epoch}')
    if run.is_main:
        results = in_test_order(results, test_dataset)
        write_results(run, results, last_epoch, config.get('topk_answers'))
        if has_ground_truth(test_dataset.ann):
            answered = {r['question_id'] for r in results}  # all of them, unless skip_bad_images skipped some
            scored = [item for item in test_dataset.ann if int(item['question_id']) in answered]
            if len(scored) < len(test_dataset.ann):
                utils.print0(f'{len(test_dataset.ann) - len(scored)} test questions without an answer are not scored')
            accuracy = vqa_accuracy(results, scored, normalization)
            utils.print0(f"VQA accuracy on {accuracy['num_questions']} questions: {accuracy['overall']:.2f}")
            engine.log_stats(run, {'vqa_acc': round(accuracy['overall'], 2),
                                   **{f'vqa_acc_{t}': round(a, 2) for t, a in accuracy['per_answer_type'].items()},
                                   'epoch': last_epoch})
    utils.barrier()


def get_parser():
    parser = engine.task_parser(__doc__, './configs/VQA.yaml', 'output/VQA',
                                evaluate='answer the test questions with the checkpoint')
    parser.add_argument('--text_decoder', default=None,
                        help='BERT name or directory for the answer decoder weights (default: the text encoder)')
    return parser


if __name__ == '__main__':
    engine.launch(main, get_parser())
