"""The training scaffold the seven task scripts share (docs/ARCHITECTURE.md). A script reads the
flags, calls `setup` (config, processes, device, tokenizer: a `Run`), builds its datasets and
loaders (`task_loaders`, `pretrain_loader`) and model, `prepare`s it (optimizer, schedule,
--checkpoint / --resume, DDP) and hands it to `fit`. One home per concept:

    options.py     the shared flags and how they override the config (the effective config)
    run.py         process and device setup: `setup(args, task) -> Run` (task: its record in tasks.py)
    data.py        the task's loaders: its datasets batched by its collate (`task_loaders`, `pretrain_loader`)
    build.py       tokenizer, text-encoder weights, `prepare` (optimizer + schedule, checkpoint, wrapping)
    checkpointing.py  saving checkpoints, keep-N, --resume (exact: position, meters, RNG states)
    loop.py        `fit` (the epochs) and `train_one_epoch` (the steps), the epoch log
    signals.py     SIGINT / SIGTERM acted on between steps, on every rank at once
    evaluation.py  evaluation helpers the fine-tuning scripts share
    launch.py      the entry point: one-line errors, exit statuses

Config loading and validation live in configuration.py, samplers and loaders in
dataset/loaders.py, each task's batches (its collate) in dataset/collate.py, reading, converting
and loading checkpoints in models/checkpoint.py (saving and resuming in engine/checkpointing.py), the
warm-up + cosine schedule in scheduler/.

A script is started in any of these ways, with the same code path:
    python Pretrain.py --config configs/Pretrain.yaml --output_dir out          (one process)
    torchrun --nproc_per_node=8 Pretrain.py ...                                 (also multi-node)
    python -m torch.distributed.launch --nproc_per_node=8 --use_env Pretrain.py ...
    srun python Pretrain.py ...                                                 (SLURM)
"""
from configuration import ConfigError
from .data import eval_loader, pretrain_loader, task_loaders, train_loader
from .build import Training, bert_weights, prepare, text_padding
from .evaluation import evaluate_accuracy, split_evaluator
from .launch import launch
from .loop import fit, log_stats, train_one_epoch
from .options import get_args_parser, task_parser
from .run import Run, setup

__all__ = ['ConfigError', 'Training', 'bert_weights', 'prepare', 'text_padding',
           'evaluate_accuracy', 'split_evaluator', 'launch', 'fit', 'log_stats', 'train_one_epoch',
           'get_args_parser', 'task_parser', 'Run', 'setup', 'task_loaders', 'pretrain_loader', 'train_loader',
           'eval_loader']
