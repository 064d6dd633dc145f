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
def evaluate_accuracy(model, loader, run):
    """Classification accuracy of `model` over a whole split: {'acc': fraction}, rounded to 4 decimals
    as the original prints it.

    With an `engine.eval_loader` each rank scores its own share and the counts are summed over ranks, so
    every example counts exactly once. The batches (dataset.Batch) carry image, text (tokenised by
    the loader workers) and targets.
    """
    model.eval()
    counts = torch.zeros(2, dtype=torch.long, device=run.device)  # correct, seen
    for batch in loader:
        batch = batch.to(run.device)
        prediction = model(batch.image, batch.text, batch.targets, train=False)
        counts[0] += (prediction.argmax(dim=1) == batch.targets).sum()
        counts[1] += batch.targets.numel()
    correct, seen = utils.all_reduce_sum(counts).tolist()
    return {'acc': round(correct / max(seen, 1), 4)}
