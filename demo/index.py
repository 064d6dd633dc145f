"""The image folder of the Search tab: ITC embeddings of every image, cached next to the images.

The cache is one file per checkpoint, `<folder>/.albef_embeddings/<checkpoint name>-<hash>.pt`, where
the hash covers the checkpoint's real path, size and modification time. Inside, each image is stored
with its own size and modification time: an image whose file changed (or a new one) is embedded
again, a removed one is dropped, and the rest are read back. Files that Pillow cannot read are
skipped, counted and remembered (by size and time too, so they are tried again once they change).
The file holds only tensors, lists and numbers and is read with `torch.load(weights_only=True)`.
"""
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field

import torch
from PIL import Image

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
CACHE_DIR = '.albef_embeddings'
CACHE_VERSION = 1


@dataclass
class Index:
    """The folder's embeddings, in the order of `names` (paths relative to the folder)."""
    folder: str
    names: list
    embeddings: torch.Tensor          # (len(names), embed_dim), L2-normalised, on the CPU
    unreadable: list = field(default_factory=list)
    embedded: int = 0                 # images embedded by this call (the rest came from the cache)
    cache_path: str = None
    cache_note: str = ''              # why the cache could not be written, if it could not

    def path(self, i):
        return os.path.join(self.folder, self.names[i])

    def summary(self):
        """One line: how many images are searched, what was skipped, what came from the cache."""
        line = f'{len(self.names)} images in {self.folder}'
        if self.unreadable:
            shown = ', '.join(self.unreadable[:5]) + (', ...' if len(self.unreadable) > 5 else '')
            line += f'; skipped {len(self.unreadable)} unreadable file{"s" * (len(self.unreadable) > 1)} ({shown})'
        reused = len(self.names) - self.embedded
        line += f'; {self.embedded} embedded now, {reused} from the cache'
        if self.cache_note:
            line += f'; {self.cache_note}'
        return line


def list_images(folder, extensions=IMAGE_EXTENSIONS):
    """Image files under `folder` (sub-folders included, hidden ones and the cache excluded), sorted,
    as paths relative to the folder."""
    extensions = tuple(e.lower() for e in extensions)
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for name in files:
            if not name.startswith('.') and name.lower().endswith(extensions):
                names.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(names)


def checkpoint_key(checkpoint):
    """A file name for the cache of `checkpoint` (a file, or an export directory), which changes when
    the checkpoint's path, size or modification time does."""
    real = os.path.realpath(checkpoint)
    files = [real] if os.path.isfile(real) else sorted(os.path.join(real, n) for n in os.listdir(real))
    stamp = [real] + [f'{os.path.basename(f)}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}' for f in files
                      if os.path.isfile(f)]
    digest = hashlib.sha1('\n'.join(stamp).encode()).hexdigest()[:16]
    label = re.sub(r'[^A-Za-z0-9_.-]+', '_', '_'.join(real.split(os.sep)[-2:]))
    return f'{label}-{digest}.pt'


def _stamp(path):
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns]


def _read_cache(path):
    try:
        cache = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # a torn or foreign file: embed everything again and overwrite it
        return None
    if not isinstance(cache, dict) or cache.get('version') != CACHE_VERSION:
        return None
    return cache


def _write_cache(path, cache):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
    try:
        with os.fdopen(handle, 'wb') as f:
            torch.save(cache, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def open_image(path):
    """The image as RGB, or None when Pillow cannot read it."""
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except Exception:  # not an image, truncated, too large for Pillow's decompression-bomb limit, ...
        return None


def build_index(model, checkpoint, folder, extensions=IMAGE_EXTENSIONS, batch_size=32, progress=None):
    """Embed (or read from the cache) every image of `folder` with `model` (a models.load result).

    progress: called as progress(done, total) while images are embedded.
    """
    names = list_images(folder, extensions)
    stamps = {name: _stamp(os.path.join(folder, name)) for name in names}
    cache_path = os.path.join(folder, CACHE_DIR, checkpoint_key(checkpoint))
    cache = _read_cache(cache_path) if os.path.isfile(cache_path) else None

    known, unreadable = {}, {}
    if cache is not None:
        for i, name in enumerate(cache['names']):
            if stamps.get(name) == list(cache['stamps'][i]):
                known[name] = cache['embeddings'][i]
        unreadable = {n: s for n, s in cache['unreadable'].items() if stamps.get(n) == list(s)}
    todo = [n for n in names if n not in known and n not in unreadable]

    for start in range(0, len(todo), batch_size):
        if progress:
            progress(start, len(todo))
        batch = todo[start:start + batch_size]
        opened = [(name, open_image(os.path.join(folder, name))) for name in batch]
        good = [(name, image) for name, image in opened if image is not None]
        unreadable.update({name: stamps[name] for name, image in opened if image is None})
        if good:
            embeddings = model.embed_images([image for _, image in good])
            known.update({name: e for (name, _), e in zip(good, embeddings)})
    if progress and todo:
        progress(len(todo), len(todo))

    kept = [n for n in names if n in known]
    dim = next(iter(known.values())).shape[0] if known else 0
    embeddings = torch.stack([known[n] for n in kept]) if kept else torch.zeros(0, dim)
    index = Index(folder, kept, embeddings, sorted(unreadable), embedded=len(todo) - sum(n in unreadable for n in todo),
                  cache_path=cache_path)
    changed = cache is None or todo or len(cache['names']) != len(kept) or len(cache['unreadable']) != len(unreadable)
    if changed:
        try:
            _write_cache(cache_path, {'version': CACHE_VERSION, 'checkpoint': os.path.realpath(checkpoint),
                                      'names': kept, 'stamps': [stamps[n] for n in kept],
                                      'embeddings': embeddings.contiguous(), 'unreadable': unreadable})
        except OSError as error:
            index.cache_path = None
            index.cache_note = f'embeddings kept in memory only: cannot write {cache_path} ({error.strerror or error})'
    return index
