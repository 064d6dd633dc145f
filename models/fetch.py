"""The original's released files by name, downloaded once into a cache.

    python -m models.fetch ALBEF          # prints the path: ~/.cache/albef/ALBEF.pth
    python -m models.fetch data           # the downstream annotation files (data.tar.gz)
    python -m models.fetch --list         # every name, what it is, and whether it is cached

`models.load('mscoco')` and `--checkpoint mscoco` in every script resolve a name here
(`resolve_checkpoint`): an existing file or directory of that name wins, a released name is
downloaded once, any other bare name (no folder, no extension) is an error that lists the names.

The cache is $ALBEF_CACHE, else ~/.cache/albef; $ALBEF_BASE_URL replaces the original's folder
(a mirror, or a local server in the tests). A download goes to `<file>.partial`, resumes from there
(an HTTP Range request) after a dropped connection or in a later run, and is renamed only when its
size is the server's Content-Length. Processes that ask for the same file at once (the ranks of a
torchrun) wait for one download (a file lock). Own code on urllib because no well-kept library
resumes a plain HTTP download through a public API (torch.hub's download_url_to_file starts again
from zero; huggingface_hub's http_get resumes but is internal to it).
"""
import argparse
import http.client
import os
import sys
import urllib.error
import urllib.request

from configuration import cache_dir, is_bare_name  # also read by precheck, before torch loads

BASE_URL = 'https://storage.googleapis.com/sfr-pcl-data-research/ALBEF/'
BASE_URL_ENV = 'ALBEF_BASE_URL'
# name -> what it is; the file is <name>.pth
MODELS = {
    'ALBEF': 'pre-trained on 14M images',
    'ALBEF_4M': 'pre-trained on 4M images',
    'mscoco': 'fine-tuned for COCO image-text retrieval',
    'flickr30k': 'fine-tuned for Flickr30K image-text retrieval',
    'vqa': 'fine-tuned for VQA (needs the answer list of data.tar.gz)',
    'refcoco': 'fine-tuned for weakly-supervised grounding on RefCOCO+',
    'pretrain_model_nlvr': 'the text-assignment pre-training that NLVR2 fine-tuning starts from',
}
# name -> (file, what it is): annotation files, fetched but not loadable as models
ARCHIVES = {
    'data': ('data.tar.gz', 'the downstream tasks\' annotation files (and VQA\'s answer list)'),
    'json_pretrain': ('json_pretrain.zip', 'the pre-training annotation files'),
}
CHUNK = 1 << 20
RETRIES = 3  # reconnections (each resumes where the last stopped) before giving up


class FetchError(FileNotFoundError):
    """A name that is not known, or a download that failed (one line: what, and what to do). A
    FileNotFoundError, which the scripts already end with one line, and importing it imports no torch."""


def names():
    return list(MODELS) + list(ARCHIVES)


def file_name(name):
    check_name(name)
    return ARCHIVES[name][0] if name in ARCHIVES else name + '.pth'


def url_of(name):
    base = os.environ.get(BASE_URL_ENV) or BASE_URL
    return base.rstrip('/') + '/' + file_name(name)


def cached_path(name, cache=None):
    return os.path.join(cache or cache_dir(), file_name(name))


def check_name(name):
    if name not in MODELS and name not in ARCHIVES:
        raise FetchError(f'{name!r} is neither a file nor a released ALBEF name; the names are '
                         f'{", ".join(names())} (python -m models.fetch --list)')


def resolve_checkpoint(checkpoint, cache=None, progress=True):
    """The path of `checkpoint`: itself when it exists (or is not a bare name), else the cached
    download of the released model of that name."""
    source = os.fspath(checkpoint)
    if os.path.exists(source) or not is_bare_name(source):
        return source
    check_name(source)
    if source in ARCHIVES:
        raise FetchError(f'{source!r} is {ARCHIVES[source][1]} ({ARCHIVES[source][0]}), not a model; '
                         f'python -m models.fetch {source} downloads it')
    return fetch(source, cache, progress)


def fetch(name, cache=None, progress=True):
    """The path of the released file `name` in the cache, downloaded first if it is not there."""
    from filelock import FileLock
    path = cached_path(name, cache)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with FileLock(path + '.lock'):
        if not os.path.isfile(path):  # another process may have finished it while this one waited
            download(url_of(name), path, progress=progress, desc=file_name(name))
    return path


def download(url, path, progress=True, desc=None, retries=None, timeout=60):
    """`url` into `path` through `path.partial`, resuming it after a dropped connection (`retries`
    times, default RETRIES); FetchError says what to do on failure."""
    partial = path + '.partial'
    total, error = None, None
    for _ in range(1 + (RETRIES if retries is None else retries)):
        before = _size(partial)
        try:
            total = _download_once(url, partial, progress, desc or os.path.basename(path), timeout)
            error = None
            break
        except urllib.error.HTTPError as failure:
            raise FetchError(f'cannot download {url}: HTTP {failure.code} {failure.reason}') from None
        except (OSError, http.client.HTTPException) as failure:  # no network, or the connection dropped
            error = failure
            if _size(partial) == before:  # nothing came: no network; waiting again would not help
                break
    size = _size(partial)
    if error is None and total is not None and size != total:
        error = f'got {size} of {total} bytes'  # more than Content-Length
    if error is not None:
        reason = getattr(error, 'reason', None) or error
        kept = f'; {partial} ({size} bytes) is kept and the same command resumes it' if size else ''
        raise FetchError(f'cannot download {url} ({reason}): download it by hand to {path}{kept}') from None
    os.replace(partial, path)
    return path


def _size(path):
    return os.path.getsize(path) if os.path.isfile(path) else 0


def _download_once(url, partial, progress, desc, timeout):
    """Append the rest of `url` to `partial`; returns the file's full size (None if unknown)."""
    from tqdm import tqdm
    done = os.path.getsize(partial) if os.path.isfile(partial) else 0
    request = urllib.request.Request(url, headers={'Range': f'bytes={done}-'} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as failure:
        if failure.code != 416 or not done:
            raise
        os.remove(partial)  # 416: the partial file is not a prefix of this file; start again
        return _download_once(url, partial, progress, desc, timeout)
    with response:
        if done and response.status != 206:
            done = 0  # the server ignored the Range header: it sends the whole file
        length = response.headers.get('Content-Length')
        total = done + int(length) if length is not None else None
        with open(partial, 'ab' if done else 'wb') as f, \
                tqdm(total=total, initial=done, unit='B', unit_scale=True, unit_divisor=1024, desc=desc,
                     disable=not progress, leave=False) as bar:
            while True:
                try:
                    block = response.read(CHUNK)
                except http.client.IncompleteRead as cut:  # the server closed the connection early
                    f.write(cut.partial)
                    break
                if not block:
                    break
                f.write(block)
                bar.update(len(block))
    size = os.path.getsize(partial)
    if total is not None and size < total:
        raise ConnectionError(f'the connection dropped at {size} of {total} bytes')  # the next try resumes
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m models.fetch', description=__doc__.split('\n\n')[0])
    parser.add_argument('names', nargs='*', metavar='NAME', help=f'one of {", ".join(names())}')
    parser.add_argument('--list', action='store_true', help='list the names, what they are and where they are cached')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    args = parser.parse_args(argv)
    try:
        if args.list or not args.names:
            for name in names():
                what = MODELS.get(name) or ARCHIVES[name][1]
                path = cached_path(name)
                state = path if os.path.isfile(path) else f'not cached ({url_of(name)})'
                print(f'{name:20s} {what}: {state}')
            return 0
        for name in args.names:
            print(fetch(name, progress=not args.quiet), flush=True)
    except OSError as error:  # FetchError, or a cache folder that cannot be written
        print(f'error: {error}', file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
