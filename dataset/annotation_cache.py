"""A big pre-training annotation file turned into a CaptionTable on disk without ever holding it
whole: the JSON list is parsed incrementally (ijson, a well-kept streaming parser whose C backend
reads about as fast as the json module), a chunk of items at a time, and each chunk's arrays are
appended to files that become the table's .npy files. Memory stays at one chunk's dicts plus the
writer's buffers, whatever the file's size."""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from typing import Callable, Iterator

import numpy as np

from .base import DataError

CHUNK_ITEMS = 100_000


def json_list_chunks(path: str, chunk: int | None = None) -> Iterator[list]:
    """The items of the JSON list in `path`, `chunk` at a time. A file that is not one valid JSON
    list raises ValueError (the caller reads it the ordinary way for the exact error)."""
    import ijson
    with open(path, 'rb') as f:
        head = f.read(4096).lstrip()
        if head.startswith(b'\xef\xbb\xbf') or not head.startswith(b'['):
            raise ValueError('not a JSON list')
        f.seek(0)
        items = ijson.items(f, 'item', use_float=True)
        try:
            while batch := list(itertools.islice(items, chunk or CHUNK_ITEMS)):
                yield batch
        except ijson.JSONError as error:
            raise ValueError(str(error)) from None


def shift_item(message: str, path: str, offset: int) -> str:
    """A message about 'item i' of a chunk, about the same item of the whole file."""
    return re.sub(rf'^{re.escape(path)}: item (\d+)', lambda m: f'{path}: item {int(m[1]) + offset}', message)


class TableWriter:
    """Appends CaptionTables (chunks of one file, in order) to raw files in `folder`; `finish`
    makes them the .npy files and folders.json that CaptionTable.load maps."""

    COLUMNS = {'folder_of': np.int32, 'is_list': np.bool_, 'first': np.int64, 'names.data': np.uint8,
               'names.offsets': np.int64, 'captions.data': np.uint8, 'captions.offsets': np.int64}

    def __init__(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.folder, self.folders = folder, {}
        self.files = {name: open(os.path.join(folder, name + '.raw'), 'wb') for name in self.COLUMNS}
        self.lengths = dict.fromkeys(self.COLUMNS, 0)
        self.items = self.name_bytes = self.caption_bytes = self.captions = 0
        self.any_list = False
        for name in ('first', 'names.offsets', 'captions.offsets'):
            self._write(name, np.zeros(1, dtype=np.int64))

    def _write(self, name: str, array: np.ndarray) -> None:
        self.files[name].write(np.ascontiguousarray(array, dtype=self.COLUMNS[name]).tobytes())
        self.lengths[name] += len(array)

    def append(self, table) -> None:
        remap = np.array([self.folders.setdefault(f, len(self.folders)) for f in table.folders] or [0], dtype=np.int32)
        self._write('folder_of', remap[table.folder_of])
        self._write('is_list', table.is_list)
        self.any_list |= bool(table.is_list.any())
        first = table.first[1:] if table.first is not None else np.arange(1, len(table) + 1)
        self._write('first', first + self.captions)
        self._write('names.data', table.names.data)
        self._write('names.offsets', table.names.offsets[1:] + self.name_bytes)
        self._write('captions.data', table.captions.data)
        self._write('captions.offsets', table.captions.offsets[1:] + self.caption_bytes)
        self.items += len(table)
        self.captions += len(table.captions)
        self.name_bytes += len(table.names.data)
        self.caption_bytes += len(table.captions.data)

    def finish(self) -> None:
        for name, dtype in self.COLUMNS.items():
            self.files[name].close()
            raw = os.path.join(self.folder, name + '.raw')
            if name == 'first' and not self.any_list:  # one caption per item: no `first`
                os.remove(raw)
                continue
            with open(os.path.join(self.folder, name + '.npy'), 'wb') as out, open(raw, 'rb') as f:
                np.lib.format.write_array_header_1_0(out, {'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                           'fortran_order': False, 'shape': (self.lengths[name],)})
                shutil.copyfileobj(f, out, 16 << 20)
            os.remove(raw)
        with open(os.path.join(self.folder, 'folders.json'), 'w') as f:
            json.dump(list(self.folders), f)


def write_table(path: str, folder: str, store_chunk: Callable[[list], object]) -> int:
    """Parse the JSON list at `path` chunk by chunk into a table saved in `folder`;
    `store_chunk(items)` validates a chunk and returns its CaptionTable (DataError naming an item
    of the chunk). Returns the number of items."""
    writer = TableWriter(folder)
    for batch in json_list_chunks(path):
        try:
            writer.append(store_chunk(batch))
        except DataError as error:
            raise DataError(shift_item(str(error), path, writer.items)) from None
    writer.finish()
    return writer.items
