"""Memory and start-up time of the pre-training annotations: ours against a list of dicts.

    python benchmarks/annotations.py --items 4000000     # at 2M and 4M, extrapolated to 14M

Writes synthetic pre-training JSON files of --items / 2 and --items items (web-style paths, 10,000
files per folder, captions of 6 to 16 words; image files are not created), then builds at each
size, each build in its own process so that its memory is its own:

  list of dicts   what the original holds: `self.ann += json.load(open(file))`
  ours, first     dataset.caption_dataset.pretrain_dataset with an empty cache: the file is
                  parsed incrementally (a chunk of items at a time) in a forked child into a
                  CaptionTable of numpy arrays saved as .npy files (no image check above 100,000 items)
  ours, cached    the same again: the saved table is memory-mapped (every later start, and every
                  other process of the machine)

and prints, at both sizes and extrapolated linearly to --target items (default 14M): the peak
memory while building (over the process after its imports; for "ours, first" the converter
child's), the CPU seconds and wall seconds of the build, the memory resident once built, and how
much each of 2 forked loader workers' private memory grows while it reads --reads random items
(copy-on-write copies of pages whose reference counts change). The baseline process is limited to
--baseline-memory GiB of address space, so running out gives an error, not a frozen machine.
"""
import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('a photo of the man woman dog cat red blue green small large on in with at near city street '
         'beach table car tree house people two three sitting standing running white black old new '
         'view night day water sky field park wall window').split()


def write_annotations(path, items, seed=0):
    rng = random.Random(seed)
    with open(path, 'w') as f:
        f.write('[')
        for start in range(0, items, 100_000):
            chunk = []
            for i in range(start, min(items, start + 100_000)):
                caption = ' '.join(rng.choices(WORDS, k=rng.randint(6, 16)))
                chunk.append(f'{{"image": "/datasets/cc12m/images/{i // 10000:05d}/{i:09d}.jpg", '
                             f'"caption": "{caption}"}}')
            f.write((',' if start else '') + ','.join(chunk))
        f.write(']')


def rss_mib():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def private_mib():
    """Private dirty memory of the anonymous mappings (the heap): copy-on-write copies land there;
    a memory-mapped file's pages, dirty or clean, are not counted."""
    total, anonymous = 0, False
    with open('/proc/self/smaps') as f:
        for line in f:
            head = line.split()
            if '-' in head[0] and len(head) >= 5:  # a mapping's header line
                anonymous = len(head) == 5 or head[5].startswith('[')
            elif head[0] == 'Private_Dirty:' and anonymous:
                total += int(head[1])
    return total / 1024


def cpu_seconds():
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def measure(kind, path, reads):
    """Runs in a child process: build, then fork 2 readers; prints one JSON line."""
    sys.path.insert(0, ROOT)
    from dataset.caption_dataset import pretrain_dataset  # imports torch: both processes pay it
    base_rss = rss_mib()
    start = time.perf_counter()
    cpu0 = cpu_seconds()
    if kind == 'baseline':
        ann = []
        ann += json.load(open(path, 'r'))
    else:
        ann = pretrain_dataset(path, None, check_images=False).ann
    get = ann.__getitem__
    build = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0  # this process and the forked converter (a waited-for child)
    rss = rss_mib() - base_rss
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    peak = peak / 1024 - base_rss  # the forked converter's peak too
    table = getattr(ann, 'nbytes', 0) / 2 ** 20
    import glob
    for record in glob.glob(os.path.join(os.environ.get('ALBEF_CACHE', '~'), 'annotations', '*', 'conversion.json')):
        if kind == 'ours' and build > 1:  # this run converted: the forked converter's peak
            peak = max(peak, json.load(open(record))['peak_memory_growth_mib'])
    n = len(ann)
    growth = []
    for worker in range(2):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # a loader worker: read random items, report its private memory growth
            os.close(read_end)
            before = private_mib()
            rng = random.Random(worker)
            for _ in range(reads):
                item = get(rng.randrange(n))
                len(item['image']) + len(item['caption'])
            os.write(write_end, json.dumps(private_mib() - before).encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as f:
            growth.append(float(f.read()))
        os.waitpid(pid, 0)
    print(json.dumps({'items': n, 'build_s': build, 'cpu_s': cpu, 'rss_mib': rss, 'peak_mib': peak, 'worker_growth_mib': growth,
                      'table_mib': table}))


def run(kind, path, reads, memory_gib=None, cache=None):
    def limit():
        if memory_gib:
            resource.setrlimit(resource.RLIMIT_AS, (int(memory_gib * 2 ** 30),) * 2)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', **({'ALBEF_CACHE': cache} if cache else {})}
    result = subprocess.run([sys.executable, __file__, '--child', kind, path, '--reads', str(reads)],
                            capture_output=True, text=True, preexec_fn=limit, env=env)
    if result.returncode != 0:
        return {'error': (result.stderr.strip().splitlines() or ['failed'])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def at_size(items, folder, reads, baseline_memory):
    """The three builds at one size: {name: result}."""
    path = os.path.join(folder, f'pretrain_{items}.json')
    if not os.path.isfile(path):
        t = time.perf_counter()
        write_annotations(path, items)
        print(f'wrote {items:,} items ({os.path.getsize(path) / 2 ** 20:.0f} MiB) in {time.perf_counter() - t:.0f}s',
              flush=True)
    cache = tempfile.mkdtemp(prefix='albef_cache_', dir=folder)
    results = {'list of dicts': run('baseline', path, reads, baseline_memory),
               'ours, first': run('ours', path, reads, cache=cache),
               'ours, cached': run('ours', path, reads, cache=cache)}
    shutil.rmtree(cache, ignore_errors=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--items', type=int, default=1_000_000, help='the larger size; the smaller is half of it')
    parser.add_argument('--target', type=int, default=14_000_000, help='the size extrapolated to')
    parser.add_argument('--baseline-memory', type=float, default=14.0, help='GiB of address space for the baseline')
    parser.add_argument('--reads', type=int, default=200_000, help='random items each forked worker reads')
    parser.add_argument('--dir', default=None, help='folder for the synthetic files (default: a temporary one)')
    parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure(args.child[0], args.child[1], args.reads)

    folder = args.dir or tempfile.mkdtemp(prefix='albef_ann_')
    os.makedirs(folder, exist_ok=True)
    small, large = args.items // 2, args.items
    runs = {n: at_size(n, folder, args.reads, args.baseline_memory) for n in (small, large)}

    def value(name, n, key):
        r = runs[n][name]
        return None if 'error' in r else r[key]

    def extrapolated(name, key):  # linear through the two sizes
        a, b = value(name, small, key), value(name, large, key)
        return None if a is None or b is None else b + (b - a) * (args.target - large) / (large - small)

    print(f'\npre-training items; each forked worker reads {args.reads:,} random items; '
          f'{args.target:,} extrapolated linearly from {small:,} and {large:,}')
    for key, title in (('peak_mib', 'peak MiB while building (the converter child for "ours, first")'),
                       ('cpu_s', 'CPU s to build (this process and its converter child)'),
                       ('build_s', 'wall s to build'), ('rss_mib', 'MiB resident once built'),
                       ('table_mib', 'MiB of the table (memory-mapped, shared)')):
        print(f'\n{title}')
        print(f"{'':16s} {small:>12,} {large:>12,} {args.target:>12,}")
        for name in ('list of dicts', 'ours, first', 'ours, cached'):
            if key == 'table_mib' and name == 'list of dicts':
                continue
            cells = [value(name, small, key), value(name, large, key), extrapolated(name, key)]
            print(f'{name:16s} ' + ' '.join(f'{c:12.1f}' if c is not None else f"{'failed':>12s}" for c in cells))
    for n in (small, large):
        for name, r in runs[n].items():
            if 'error' in r:
                print(f'{name} at {n:,}: failed: {r["error"]}')
        growth = {name: '/'.join(f'{g:.0f}' for g in r['worker_growth_mib'])
                  for name, r in runs[n].items() if 'error' not in r}
        print(f'private memory growth of each of 2 forked workers at {n:,} (MiB): {growth}')


if __name__ == '__main__':
    main()
