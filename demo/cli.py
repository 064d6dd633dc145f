"""Command line of the web demo: `python -m demo [--checkpoint CKPT] [--vqa_checkpoint CKPT] [--images DIR]`.

Without arguments it serves the demo world of the README: the newest demo checkpoints under
output/demo/ (a retrieval or pre-training one for Look and Search, a VQA one for Ask) and the PNG
scenes of data/demo/images, and says in one line what it loaded or what is missing and which
command makes it. Bad input (a missing checkpoint or folder, a file that is no checkpoint, a port in
use) ends it with one line on stderr and exit status 2.
"""
import argparse
import json
import os
import sys

from configuration import one_line

DEMO_OUTPUT = os.path.join('output', 'demo')
DEMO_WORLD = os.path.join('data', 'demo')
DEMO_COMMAND = 'the demo command of README.md (python -m dataset.toy --out data/demo, then Pretrain.py and Retrieval.py)'
VQA_COMMAND = ('python VQA.py --config configs/demo/VQA.yaml --checkpoint output/demo/pretrain/checkpoint_29.pth '
               '--output_dir output/demo/vqa --device cpu')
WORLD_COMMAND = 'python -m dataset.toy --out data/demo'


class BadInput(Exception):
    """One line for stderr; the demo exits with status 2."""


def get_parser():
    parser = argparse.ArgumentParser(prog='python -m demo', description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', help='retrieval or pre-training checkpoint (.pth or export directory) '
                                             'for Look and Search; default: the newest under output/demo/')
    parser.add_argument('--vqa_checkpoint', help='VQA checkpoint for Ask; default: the newest VQA checkpoint '
                                                 'under output/demo/ when --checkpoint is not given')
    parser.add_argument('--images', help='image folder that Search ranks; default: data/demo/images when '
                                         '--checkpoint is not given')
    parser.add_argument('--extensions', default=None,
                        help='comma-separated image extensions that Search indexes (default: jpg,jpeg,png,bmp,gif,'
                             'webp,tif,tiff; png for the demo world, whose JPEGs repeat its PNG scenes)')
    parser.add_argument('--host', default='127.0.0.1', help='address to bind (default 127.0.0.1: this machine only)')
    parser.add_argument('--port', type=int, default=7860)
    parser.add_argument('--share', action='store_true', help='also open a public gradio.live link (off by default)')
    parser.add_argument('--max_file_size', default='10mb', help='upload size limit, e.g. 10mb (default) or 200kb')
    parser.add_argument('--device', default=None, help='cuda or cpu (default: cuda when present)')
    parser.add_argument('--text_encoder', default=None, help='tokenizer directory or name, when the checkpoint '
                                                             'does not say')
    parser.add_argument('--answer_list', default=None, help="answer_list.json for a VQA checkpoint whose config "
                                                            "does not name one (the released vqa.pth)")
    parser.add_argument('--trust_checkpoint', action='store_true',
                        help='allow unpickling Python objects from checkpoints you trust')
    return parser


# ---- the demo world -----------------------------------------------------------------------------
def demo_checkpoints(root=DEMO_OUTPUT):
    """One checkpoint per folder under `root`, newest folder first: its checkpoint_best.pth when there
    is one (the fine-tuning scripts' best epoch), else its newest .pth."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        paths = [os.path.join(folder, f) for f in files if f.endswith('.pth')]
        if not paths:
            continue
        best = os.path.join(folder, 'checkpoint_best.pth')
        newest = max(paths, key=os.path.getmtime)
        found.append((os.path.getmtime(newest), best if best in paths else newest))
    return [path for _, path in sorted(found, reverse=True)]


def demo_examples(folder):
    """Look's and Ask's examples from the demo world's test files next to `folder`, if it is one."""
    world = os.path.dirname(os.path.abspath(folder))
    look, ask = [], []
    try:
        with open(os.path.join(world, 'retrieval_test.json')) as f:
            look = [[os.path.join(folder, item['image']), item['caption'][0]] for item in json.load(f)[:4]]
        with open(os.path.join(world, 'vqa_test.json')) as f:
            first = {}  # one question for each of the first four images
            for item in json.load(f):
                first.setdefault(item['image'], item['question'])
                if len(first) == 4:
                    break
            ask = [[os.path.join(folder, image), question] for image, question in first.items()]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    return [e for e in look if os.path.isfile(e[0])], [e for e in ask if os.path.isfile(e[0])]


# ---- loading ------------------------------------------------------------------------------------
def check_paths(args):
    """The paths given on the command line exist (checked before anything slow is imported)."""
    from models.fetch import is_bare_name
    for flag in ('checkpoint', 'vqa_checkpoint'):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path) and not is_bare_name(path):  # a name: models/fetch.py
            raise BadInput(f'--{flag} {path}: no such file or directory')
    if args.images is not None and not os.path.isdir(args.images):
        raise BadInput(f'--images {args.images}: not a directory')
    if args.answer_list is not None and not os.path.isfile(args.answer_list):
        raise BadInput(f'--answer_list {args.answer_list}: no such file')


def load(path, args, what, **kwargs):
    """models.load, with every failure turned into one line naming the file."""
    import contextlib
    import io

    from models.api import load as load_model
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the key report of loading: the one line says it
            return load_model(path, device=args.device, text_encoder=args.text_encoder,
                              trust_checkpoint=args.trust_checkpoint, **kwargs)
    except Exception as error:  # CheckpointError, TaskError, a file that is no checkpoint, ...: one line
        message = one_line(error)
        raise BadInput(message if path in message else f'{what} {path}: {message}') from None


def resolve(args):
    """The DemoModels to serve, and the one line that says what they are."""
    check_paths(args)
    world = args.checkpoint is None
    candidates = demo_checkpoints() if world else []
    if world and not candidates:
        raise BadInput(f'no --checkpoint given and no demo checkpoint under {DEMO_OUTPUT}/: '
                       f'make one with {DEMO_COMMAND}, or pass --checkpoint CKPT')
    from .app import DemoModels, look_model_note, vqa_model_note
    from .index import IMAGE_EXTENSIONS, list_images

    models = DemoModels()
    notes = []
    if world:
        for path in candidates:  # newest first: the first one with ITC and ITM heads, the first VQA one
            if models.model is not None and (models.vqa is not None or args.vqa_checkpoint):
                break
            loaded = load(path, args, '--checkpoint', answer_list=args.answer_list)
            if loaded.task == 'vqa' and models.vqa is None and not args.vqa_checkpoint:
                models.vqa, models.vqa_checkpoint = loaded, path
            elif not look_model_note(loaded, path) and models.model is None:
                models.model, models.checkpoint = loaded, path
        if models.model is None:
            raise BadInput(f'no retrieval or pre-training checkpoint under {DEMO_OUTPUT}/ '
                           f'(found {", ".join(candidates)}): make one with {DEMO_COMMAND}, or pass --checkpoint')
    else:
        models.model, models.checkpoint = load(args.checkpoint, args, '--checkpoint',
                                               answer_list=args.answer_list), args.checkpoint
        models.model_note = look_model_note(models.model, args.checkpoint)
        if models.model.task == 'vqa' and not args.vqa_checkpoint:  # serve Ask with it at least
            models.vqa, models.vqa_checkpoint = models.model, args.checkpoint

    if args.vqa_checkpoint:
        models.vqa = load(args.vqa_checkpoint, args, '--vqa_checkpoint', answer_list=args.answer_list)
        models.vqa_checkpoint = args.vqa_checkpoint
        models.vqa_note = vqa_model_note(models.vqa, args.vqa_checkpoint)
    elif models.vqa is None:
        models.vqa_note = ('Ask is off: answering questions needs a VQA checkpoint: '
                           + (f'make one with {VQA_COMMAND}' if world else 'pass one with --vqa_checkpoint'))

    extensions = tuple('.' + e.strip().lstrip('.') for e in args.extensions.split(',') if e.strip()) \
        if args.extensions else None
    if args.images:
        models.folder, models.extensions = args.images, extensions or IMAGE_EXTENSIONS
    elif world and os.path.isdir(os.path.join(DEMO_WORLD, 'images')):
        models.folder, models.extensions = os.path.join(DEMO_WORLD, 'images'), extensions or ('.png',)
    else:
        models.folder_note = ('Search is off: no image folder: ' +
                              (f'make the demo world with {WORLD_COMMAND}' if world else 'pass one with --images DIR'))

    if models.folder:
        models.examples, models.vqa_examples = demo_examples(models.folder)
        if not models.examples:
            models.examples = [[os.path.join(models.folder, n)] for n in list_images(models.folder,
                                                                                    models.extensions)[:4]]
        count = len(list_images(models.folder, models.extensions))
        notes.append(f'Search: {models.folder} ({count} image files)')
    else:
        notes.append(models.folder_note)
    looks = f'Look and Search: {models.checkpoint} ({models.model.task})'
    notes.insert(0, models.model_note or looks)
    notes.insert(1, f'Ask: {models.vqa_checkpoint} ({models.vqa.task})' if models.vqa and not models.vqa_note
                 else models.vqa_note)
    return models, '; '.join(notes)


def main(argv=None):
    args = get_parser().parse_args(argv)
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # nothing leaves the machine
    try:
        models, line = resolve(args)
        print(f'ALBEF demo: {line}', flush=True)
        from .app import build_app
        from .index import CACHE_DIR
        app = build_app(models)
        app.queue(default_concurrency_limit=1)
        allowed = [os.path.abspath(models.folder)] if models.folder else []
        blocked = [os.path.join(a, CACHE_DIR) for a in allowed]
        app.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=args.max_file_size,
                   allowed_paths=allowed, blocked_paths=blocked, show_error=True, ssr_mode=False, inbrowser=False,
                   quiet=True, prevent_thread_lock=True)
        where = ('this machine only' if args.host in ('127.0.0.1', 'localhost', '::1')
                 else f'bound to {args.host}: other machines can reach it')
        print(f'ALBEF demo: open {app.local_url} ({where}'
              + (f'; public link {app.share_url}' if args.share and app.share_url else '') + ')', flush=True)
        app.block_thread()
    except BadInput as error:
        print(f'demo: {error}', file=sys.stderr)
        return 2
    except OSError as error:  # e.g. the port is taken
        print(f'demo: cannot serve on {args.host}:{args.port}: {error}', file=sys.stderr)
        return 2
    return 0
