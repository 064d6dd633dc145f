"""Export a checkpoint as a directory to share, e.g. on the Hugging Face Hub:

    python -m models.export output/demo/retrieval/checkpoint_best.pth --out albef-demo-retrieval
    huggingface-cli upload USER/albef-demo-retrieval albef-demo-retrieval   # or huggingface_hub.upload_folder

The directory holds
    model.safetensors   the weights in the released fine-tuned layout: no momentum encoders, no queues
                        (they serve training only), safetensors metadata {'format': 'pt', 'task': ...}
    config.json         the model config: task, image_res, ViT and projection sizes, the BERT config itself
    vocab.txt, tokenizer_config.json, ...   the tokenizer (transformers' save_pretrained)
    answer_list.json    VQA only: the candidate answers, when the checkpoint's config names them
and nothing to unpickle: `models.load(DIR)` (or `models.load(huggingface_hub.snapshot_download(REPO))`)
loads it as it is, and `--checkpoint DIR` starts a fine-tuning run from it.
"""
import argparse
import json
import os
import sys

from .api import ANSWER_LIST_FILE, CONFIG_FILE, MODEL_KEYS, TASKS, build_model, load_tokenizer, resolve
from .checkpoint import SAFETENSORS_FILE, CheckpointError, load_checkpoint, strip_for_release


def export(checkpoint, out, task=None, text_encoder=None, answer_list=None, trust_checkpoint=False, overwrite=True):
    """Write the export directory `out` of `checkpoint`; returns the list of files written.

    Everything is checked before the first file is written: the weights must load into the task's
    model, and the tokenizer must load; without `overwrite`, `out` must hold no export yet."""
    from safetensors.torch import save_file
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f'--out {out}: exists and is not a directory')
    if not overwrite and os.path.exists(os.path.join(out, SAFETENSORS_FILE)):
        raise CheckpointError(f'--out {out} already holds an export ({SAFETENSORS_FILE}): pass --overwrite to '
                              f'replace it, or choose another directory')
    resolved = resolve(checkpoint, task, text_encoder, answer_list, trust_checkpoint)
    tokenizer = load_tokenizer(resolved.tokenizer_source)
    state_dict = strip_for_release(resolved.state_dict)
    load_checkpoint(build_model(resolved.task, resolved.config, tokenizer), state_dict, allow_new_heads=False,
                    source=resolved.source)
    # one tensor per key: safetensors stores no shared storage (tied embeddings, NLVR's shared
    # cross-attention keys and values are separate copies on disk and tied again by the model)
    tensors = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
    config = {'architecture': 'ALBEF', 'task': resolved.task,
              **{k: resolved.config[k] for k in MODEL_KEYS if k in resolved.config},
              'bert_config': resolved.config['bert_config']}

    os.makedirs(out, exist_ok=True)
    written = []

    def path(name):
        written.append(os.path.join(out, name))
        return written[-1]

    save_file(tensors, path(SAFETENSORS_FILE), metadata={'format': 'pt', 'task': resolved.task})
    with open(path(CONFIG_FILE), 'w') as f:
        json.dump(config, f, indent=2)
        f.write('\n')
    written += [name for name in tokenizer.hf.save_pretrained(out) if os.path.isfile(name)]
    # a fast tokenizer may save only tokenizer.json; vocab.txt is what BERT tools look for
    if not any(os.path.basename(name) == 'vocab.txt' for name in written):
        with open(path('vocab.txt'), 'w', encoding='utf-8') as f:
            vocab = tokenizer.hf.get_vocab()
            f.writelines(token + '\n' for token, _ in sorted(vocab.items(), key=lambda item: item[1]))
    stale = os.path.join(out, ANSWER_LIST_FILE)  # from an earlier export into the same directory
    if os.path.isfile(stale) and not (resolved.task == 'vqa' and resolved.answer_list):
        os.remove(stale)
    if resolved.task == 'vqa' and resolved.answer_list:
        with open(path(ANSWER_LIST_FILE), 'w') as f:
            json.dump(resolved.answer_list, f)
    return sorted(set(written))


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m models.export', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint', help='a .pth checkpoint (ours or a released one) or an export directory')
    parser.add_argument('--out', required=True, help='directory to write')
    parser.add_argument('--task', choices=TASKS, default=None, help="default: read from the checkpoint's keys")
    parser.add_argument('--text_encoder', default=None,
                        help="tokenizer (BERT name or directory); default: the checkpoint config's, else "
                             "bert-base-uncased")
    parser.add_argument('--answer_list', default=None, help='VQA: the candidate answers (a JSON list)')
    parser.add_argument('--trust_checkpoint', action='store_true',
                        help='fully unpickle a checkpoint that holds Python objects besides tensors')
    parser.add_argument('--overwrite', action='store_true', help='replace an export already in --out')
    args = parser.parse_args(argv)
    try:
        written = export(args.checkpoint, args.out, args.task, args.text_encoder, args.answer_list,
                         args.trust_checkpoint, overwrite=args.overwrite)
    except (CheckpointError, FileNotFoundError) as error:
        print(f'error: {error}', file=sys.stderr, flush=True)
        sys.exit(2)
    print(f'wrote {args.out}: ' + ', '.join(sorted(os.path.basename(p) for p in written)))


if __name__ == '__main__':
    main()
