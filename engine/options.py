"""The command-line flags every script shares, and how they override the config: the effective
config (flag, else config key, else default) is a new dict, written to output_dir/config.yaml and
into every checkpoint."""
import argparse
import copy
import os
import sys

import torch

import tasks
import tracking
from configuration import ConfigError

AMP_MODES = ('bf16', 'fp16', 'off')
COMPILE_MODES = ('layers', 'step')  # config key compile: also true (= layers) or false
POSITIVE_INT_KEYS = ('keep_checkpoints', 'num_threads')
# The flags that are also config keys of the same name (each in tasks.COMMON_KEYS, with its check):
# the effective config holds the flag, else the key. They are the flags of the parser's groups
# titled ALSO_A_KEY (tests/test_config_values.py checks that the three agree).
ALSO_A_KEY = '(each also a config key of the same name)'
SPEED_FLAGS = ('amp', 'grad_checkpointing', 'accum_steps', 'compile', 'eval_amp', 'num_threads')
TRAINING_FLAGS = ('freeze_vision', 'freeze_text', 'grad_clip_norm')


def get_args_parser(config, output_dir):
    """The flags every script shares; scripts add their own on top (argparse `parents=`)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--config', default=config, help='task YAML file')
    parser.add_argument('--output_dir', default=output_dir, help='where logs and checkpoints go')
    parser.add_argument('--checkpoint', default='', help='checkpoint to start from (original or ours)')
    parser.add_argument('--text_encoder', default=None,
                        help="BERT name or directory for the tokenizer and weights (default: the config's "
                             "text_encoder, else bert-base-uncased)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seed', default=42, type=int)
    parser.add_argument('--dist_url', default='env://',
                        help='how the processes find each other (env://: the launcher\'s MASTER_ADDR/PORT)')
    parser.add_argument('--distributed', default=True, action=argparse.BooleanOptionalAction,
                        help='join the process group when a launcher started several processes')
    parser.add_argument('--resume', action='store_true',
                        help='continue from the newest checkpoint in --output_dir')
    parser.add_argument('--trust_checkpoint', action='store_true', default=None,
                        help='fully unpickle a --checkpoint that holds Python objects besides tensors (only '
                             'for files from a source you trust; also the config key trust_checkpoint)')
    parser.add_argument('--overwrite', action='store_true',
                        help='start again in an --output_dir that holds checkpoints (they are replaced)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--log_to', default=None,
                        help="where rank 0 also sends the step and epoch scalars: a comma-separated list of "
                             "tensorboard (output_dir/tensorboard/) and wandb, or none (default: the config's "
                             "log_to, else tensorboard)")
    speed = parser.add_argument_group(f'speed and memory {ALSO_A_KEY}')
    speed.add_argument('--amp', choices=AMP_MODES, default=None,
                       help='mixed precision for training (default: bf16 on GPUs that support it, else off)')
    speed.add_argument('--grad_checkpointing', default=None, action=argparse.BooleanOptionalAction,
                       help='recompute the online encoders\' activations in the backward pass (less memory)')
    speed.add_argument('--accum_steps', type=int, default=None,
                       help='micro-batches per optimizer step (gradient accumulation; default 1)')
    speed.add_argument('--compile', nargs='?', const='layers', choices=COMPILE_MODES, default=None,
                       help="torch.compile: 'layers' (the default of a bare --compile) compiles each ViT block "
                            "and BERT layer; 'step' the whole model's forward and backward, and the "
                            "optimizer step with a tensor lr (CUDA graphs on GPUs); falls back to eager mode "
                            "if the compiler fails (default: eager)")
    speed.add_argument('--no-compile', '--no_compile', dest='compile', action='store_const', const=False,
                       help='eager mode, whatever the config says')
    speed.add_argument('--eval_amp', default=None, action=argparse.BooleanOptionalAction,
                       help='evaluate under the training --amp precision (default: float32)')
    speed.add_argument('--num_threads', type=int, default=None,
                       help='intra-op CPU threads of each process (default: the cores this process may use, '
                            'shared among the processes of the node, less one per loader worker)')
    training = parser.add_argument_group(f'what is trained {ALSO_A_KEY}')
    training.add_argument('--freeze_vision', nargs='?', const=True, type=int, default=None, metavar='N',
                          help='freeze the image encoder: all of it, or with N its patch embedding and lowest N '
                               'blocks (0: nothing); its momentum copy stays equal to it')
    training.add_argument('--freeze_text', nargs='?', const=True, type=int, default=None, metavar='N',
                          help='freeze the text encoder (the BERT layers below the first fusion layer, and the '
                               'embeddings): all of it, or with N the embeddings and lowest N layers (0: nothing)')
    training.add_argument('--grad_clip_norm', type=float, default=None, metavar='NORM',
                          help="clip the total gradient norm to NORM before each optimizer step (default: off, "
                               "as the original)")
    return parser


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and a pointer to --help, not the full usage."""

    def error(self, message):
        if os.environ.get('RANK', '0') == '0':  # under torchrun every process parses; one reports
            print(f'error: {message} (--help lists the flags)', file=sys.stderr, flush=True)
        sys.exit(2)


def task_parser(description, config, output_dir, evaluate=None):
    """A task script's parser: its docstring as the description, the shared flags with the script's
    default config and output_dir, and with `evaluate` (its help text) the --evaluate flag."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[get_args_parser(config, output_dir)])
    if evaluate:
        parser.add_argument('--evaluate', action='store_true', help=evaluate)
    return parser


def effective_config(args, config, device):
    """(the config with the flags applied and defaults filled in, the tracking backends); `config`
    itself is left as it was."""
    config = copy.deepcopy(config)
    config.setdefault('text_encoder', 'bert-base-uncased')
    if args.text_encoder:
        config['text_encoder'] = args.text_encoder
    speed_options(args, config, device)
    training_options(args, config)
    for key in POSITIVE_INT_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            where = f'--{key}' if getattr(args, key, None) is not None else f'{args.config}: {key}'
            raise ConfigError(f'{where}: expected a positive integer, got {value!r}')
    return config, log_to_option(args, config)


def speed_options(args, config, device):
    """Resolve the SPEED_FLAGS in `config`: the flag, else the config key, else the default (for
    num_threads: engine.run.set_threads)."""
    for key in SPEED_FLAGS:
        if getattr(args, key, None) is not None:
            config[key] = getattr(args, key)
    if config.get('amp') is None:
        config['amp'] = 'bf16' if device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'off'
    if config['amp'] is False:  # YAML `amp: off` reads as a boolean
        config['amp'] = 'off'
    if config['amp'] not in AMP_MODES:
        raise ConfigError(f"amp: expected one of {', '.join(AMP_MODES)}, got {config['amp']!r}")
    if config['amp'] == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise ConfigError('amp bf16: this GPU does not support bfloat16 (use --amp fp16 or --amp off)')
    config.setdefault('accum_steps', 1)
    if isinstance(config['accum_steps'], bool) or not isinstance(config['accum_steps'], int) \
            or config['accum_steps'] < 1:
        raise ConfigError(f"accum_steps: expected a positive integer, got {config['accum_steps']!r}")
    config.setdefault('grad_checkpointing', False)
    config['compile'] = compile_mode(config.get('compile'))
    if config['compile'] == 'step' and config['amp'] == 'fp16':
        raise ConfigError('compile step: --amp fp16 is not supported (its GradScaler skips optimizer steps on '
                          'the host, outside the compiled step); use --amp bf16, --amp off or --compile layers')


def compile_mode(value):
    """The config key / flag `compile` as False, 'layers' or 'step' (true: 'layers', as before 'step')."""
    if value is None or value is False:
        return False
    if value is True:
        return 'layers'
    if value not in COMPILE_MODES:
        raise ConfigError(f"compile: expected {tasks.COMMON_KEYS['compile'].allowed}, got {value!r}")
    return value


def training_options(args, config):
    """Resolve freeze_vision / freeze_text / grad_clip_norm in `config` (the flag, else the config
    key; absent: nothing frozen, no clipping) and check their types. Whether a number of blocks fits
    the model is checked when the model is built (models/freeze.py)."""
    for key in TRAINING_FLAGS:
        flag = getattr(args, key, None)
        if flag is not None:
            config[key] = flag
        where = f'--{key}' if flag is not None else f'{args.config}: {key}'
        value = config.get(key)
        if value is None:
            continue
        if key == 'grad_clip_norm':
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float('inf'):
                raise ConfigError(f'{where}: expected a positive number (the largest total gradient norm), '
                                  f'got {value!r}')
        elif not isinstance(value, int) or value < 0:  # a bool is an int: true / false
            raise ConfigError(f'{where}: expected true, false or a number of lower blocks (0 or more), got {value!r}')


def log_to_option(args, config):
    """The --log_to flag, else the config key log_to, else 'tensorboard'; the effective value
    goes into `config` as a string such as 'tensorboard,wandb' or 'none'."""
    flag = getattr(args, 'log_to', None)
    where = '--log_to' if flag is not None else f'{args.config}: log_to'
    try:
        backends = tracking.parse_log_to(flag if flag is not None else config.get('log_to'), where)
    except tracking.LogToError as error:
        raise ConfigError(str(error)) from None
    config['log_to'] = ','.join(backends) or 'none'
    return backends
