"""A task's loaders for this process (dataset/loaders.py), from its record (tasks.py) and the Run:
`task_loaders(run, task, ...)` for a fine-tuning task, `pretrain_loader(run, task, ...)` for the
pre-training data, and the two underlying builders `train_loader` and `eval_loader`. Every loader
batches with the collate the task's record names (dataset/collate.py): the texts are tokenised in
the loader workers, and each batch is a `dataset.Batch`."""
import configuration
import dataset.loaders
from dataset import collate_for, create_dataset
from .build import text_padding


def _config_path(run):
    return getattr(run.args, 'config', 'the config')


def collate(run, task, train=True):
    """The task's collate (training or evaluation), with this run's tokenizer and text padding."""
    return collate_for(task, run.tokenizer, run.config, train=train, padding=text_padding(run))


def task_loaders(run, task, train_batch_size, eval_batch_size):
    """(training loader, one evaluation loader per split) of a fine-tuning task's datasets (task:
    its record or name in tasks.py), in the order `dataset.create_dataset(task, config)` returns
    them."""
    train, *evaluation = create_dataset(getattr(task, 'name', task), run.config)
    return (train_loader(run, train, train_batch_size, collate(run, task)),
            *(eval_loader(run, split, eval_batch_size, collate(run, task, train=False)) for split in evaluation))


def pretrain_loader(run, task, batch_size):
    """Image-caption batches of the pre-training data: a JSON `train_file`, tar `train_shards`,
    or both (uint8 images, for dataset.normalize on the device)."""
    configuration.require_one_of(run.config, _config_path(run), ('train_file', 'train_shards'))
    pairs = create_dataset('pretrain', run.config, uint8=True) if run.config.get('train_file') else None
    return train_loader(run, pairs, batch_size, collate(run, task))


def train_loader(run, data, batch_size, collate_fn=None):
    """Shuffled, resumable training batches of this rank (see dataset.loaders.train_loader)."""
    return dataset.loaders.train_loader(
        data, batch_size, run.config, rank=run.rank, world_size=run.world_size, seed=run.seed,
        pin_memory=run.device.type == 'cuda', collate_fn=collate_fn, tokenizer=run.tokenizer,
        check_batches=not run.evaluating, config_path=_config_path(run))


def eval_loader(run, data, batch_size, collate_fn=None):
    """This rank's share of an evaluation split, in file order (see dataset.loaders.eval_loader)."""
    return dataset.loaders.eval_loader(data, batch_size, run.config, rank=run.rank, world_size=run.world_size,
                                       pin_memory=run.device.type == 'cuda', collate_fn=collate_fn)
