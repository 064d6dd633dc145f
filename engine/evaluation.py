"""Evaluation helpers the fine-tuning scripts share: `split_evaluator` (the `evaluate(epoch)` that
`fit` calls, over named splits) and `evaluate_accuracy` (classification accuracy across ranks)."""
import torch

import utils


def split_evaluator(loaders, score):
    """The `evaluate(epoch)` of `fit`: {'<split>_<metric>': value} over the named loaders
    ({'val': ..., 'test': ...}), where `score(loader)` returns {metric: value}; float values are
    kept to 6 significant digits."""
    def evaluate(epoch):
        stats = {}
        for split, loader in loaders.items():
            # float noise (72.39999999999999) off: the numbers printed are those log.txt stores
            result = {k: utils.significant(v) for k, v in score(loader).items()}
            utils.print0(f'{split}: {result}')
            stats.update({f'{split}_{k}': v for k, v in result.items()})
        return stats
    return evaluate


@torch.no_grad()
def evaluate_accuracy(model, loader, run, unpack=None):
    """Classification accuracy of `model` over a whole split: {'acc': fraction}, rounded to 4 decimals
    as the original prints it.

    With a `run.eval_loader` each rank scores its own share and the counts are summed over ranks, so
    every example counts exactly once. A batch is (image, texts, targets), or `unpack(batch)` makes
    it so; texts are tokenised with padding='longest'.
    """
    model.eval()
    counts = torch.zeros(2, dtype=torch.long, device=run.device)  # correct, seen
    for batch in loader:
        image, text, targets = unpack(batch) if unpack is not None else batch
        image, targets = utils.to_device((image, targets), run.device)
        prediction = model(image, run.tokenize(text), targets, train=False)
        counts[0] += (prediction.argmax(dim=1) == targets).sum()
        counts[1] += targets.numel()
    correct, seen = utils.all_reduce_sum(counts).tolist()
    return {'acc': round(correct / max(seen, 1), 4)}
