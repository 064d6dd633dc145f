"""Memory and start-up time of the pre-training annotations: ours against a list of dicts.

    python benchmarks/annotations.py --items 14000000
    python benchmarks/annotations.py --items 14000000 --baseline-items 2000000   # baseline scaled up

Writes a synthetic pre-training JSON file of --items items (web-style paths, 10,000 files per
folder, captions of 6 to 16 words; image files are not created), then builds, each in its own
process so that its memory is its own:

  list of dicts   what the original holds: `self.ann += json.load(open(file))`
  ours, first     dataset.caption_dataset.pretrain_dataset with an empty cache: the file is
                  parsed once in a forked child into a CaptionTable of numpy arrays, saved as
                  .npy files (no image check above 100,000 items)
  ours, cached    the same again: the saved table is memory-mapped (every later start, and every
                  other process of the machine)

and prints side by side: the build time, the resident memory the annotations add once built (and at the peak while
building; both over the process after its imports), and how much each of 2 forked loader workers' private memory grows while it reads
--reads random items (copy-on-write copies of pages whose reference counts change). With --baseline-items M
the baseline runs on the first M items and its numbers are scaled by items / M (marked
'extrapolated'): a list of 14M dicts takes about 17 GB. The baseline process is limited to
--baseline-memory GiB of address space, so running out gives an error, not a frozen machine.
"""
import argparse
import json
import os
import random
import resource
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


def measure(kind, path, reads):
    """Runs in a child process: build, then fork 2 readers; prints one JSON line."""
    sys.path.insert(0, ROOT)
    from dataset.caption_dataset import pretrain_dataset  # imports torch: both processes pay it
    base_rss = rss_mib()
    start = time.perf_counter()
    if kind == 'baseline':
        ann = []
        ann += json.load(open(path, 'r'))
    else:
        ann = pretrain_dataset(path, None).ann
    get = ann.__getitem__
    build = time.perf_counter() - start
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
    print(json.dumps({'items': n, 'build_s': build, 'rss_mib': rss, 'peak_mib': peak, 'worker_growth_mib': growth,
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--items', type=int, default=1_000_000)
    parser.add_argument('--baseline-items', type=int, default=None, help='run the baseline on this many and scale')
    parser.add_argument('--baseline-memory', type=float, default=14.0, help='GiB of address space for the baseline')
    parser.add_argument('--reads', type=int, default=200_000, help='random items each forked worker reads')
    parser.add_argument('--dir', default=None, help='folder for the synthetic files (default: a temporary one)')
    parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure(args.child[0], args.child[1], args.reads)

    folder = args.dir or tempfile.mkdtemp(prefix='albef_ann_')
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'pretrain_{args.items}.json')
    if not os.path.isfile(path):
        t = time.perf_counter()
        write_annotations(path, args.items)
        print(f'wrote {args.items:,} items ({os.path.getsize(path) / 2 ** 20:.0f} MiB) in {time.perf_counter() - t:.0f}s')
    base_items = args.baseline_items or args.items
    base_path = path
    if base_items != args.items:
        base_path = os.path.join(folder, f'pretrain_{base_items}.json')
        if not os.path.isfile(base_path):
            write_annotations(base_path, base_items)
    cache = tempfile.mkdtemp(prefix='albef_cache_', dir=folder)
    results = {'ours, first': run('ours', path, args.reads, cache=cache),
               'ours, cached': run('ours', path, args.reads, cache=cache)}
    baseline = run('baseline', base_path, args.reads, args.baseline_memory)
    scale = args.items / base_items
    if 'error' not in baseline and scale != 1:
        baseline = {k: (v * scale if k in ('build_s', 'rss_mib', 'peak_mib') else v) for k, v in baseline.items()}
        baseline['note'] = f'extrapolated x{scale:.1f} from {base_items:,} items'
    results['list of dicts'] = baseline

    print(f'\n{args.items:,} pre-training items; each forked worker reads {args.reads:,} random items')
    print(f"{'':16s} {'build s':>9s} {'RSS MiB':>9s} {'peak MiB':>9s} {'worker +MiB':>13s} {'table MiB':>10s}")
    for name, r in results.items():
        if 'error' in r:
            print(f'{name:16s} failed: {r["error"]}')
            continue
        growth = '/'.join(f'{g:.0f}' for g in r['worker_growth_mib'])
        table = f"{r['table_mib']:10.0f}" if r.get('table_mib') else f"{'':10s}"
        print(f"{name:16s} {r['build_s']:9.1f} {r['rss_mib']:9.0f} {r['peak_mib']:9.0f} {growth:>13s} {table}"
              + (f"   ({r['note']})" if 'note' in r else ''))
    base = results['list of dicts']
    for name in ('ours, first', 'ours, cached'):
        ours = results[name]
        if 'error' not in ours and 'error' not in base:
            print(f"list of dicts / {name}: build {base['build_s'] / ours['build_s']:.1f}x, resident (the table "
                  f"once touched, shared by every process) {base['rss_mib'] / max(ours['table_mib'], 1e-9):.1f}x, "
                  f"peak {base['peak_mib'] / max(ours['peak_mib'], 1):.1f}x")
    print('RSS of ours counts only the pages touched so far; table MiB is what it holds once all are read '
          '(memory-mapped file pages, shared by the processes and workers of the machine)')


if __name__ == '__main__':
    main()
