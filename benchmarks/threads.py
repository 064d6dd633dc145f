"""Step time of the demo pre-training at different intra-op thread counts, on an idle machine and
with a concurrent CPU load (one busy process per core), side by side.

    python benchmarks/threads.py                      # the default choice, every core, one thread
    python benchmarks/threads.py --steps 20 --workers 0

The default choice (no --num_threads, no OMP_NUM_THREADS) is the cores in this process's
affinity mask, shared among the processes of the node, less one per loader worker, capped by the
node's idle cores (engine.run.default_threads; the row's count is the choice before the load starts,
each run makes its own, fewer under the load); a setting that comes to the same count is not run twice. Each setting
runs Pretrain.py in its own process on a small demo world (made once in a temporary directory)
and reads the seconds per step from its epoch summary (`Total time: ... (X s / it)`, which
includes the first, slower step). Printed: one row per setting, the idle and the loaded time per
step, and how much slower the load made it.
"""
import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def busy():
    while True:
        pass


def make_config(directory, steps, workers):
    from ruamel.yaml import YAML

    from dataset import toy
    world = os.path.join(directory, 'data')
    toy.main(['--out', world, '--scale', '0.3'])
    with open(os.path.join(ROOT, 'configs', 'demo', 'Pretrain.yaml')) as f:
        config = YAML(typ='safe').load(f)
    config = {k: world + v[len('data/demo'):] if isinstance(v, str) and v.startswith('data/demo') else v
              for k, v in config.items()}
    config['train_file'] = [os.path.join(world, 'pretrain.json')]
    config['bert_config'] = os.path.join(ROOT, config['bert_config'])
    batch = 180 // steps  # the 0.3-scale world has 180 training scenes: `steps` steps in one epoch
    config.update(batch_size=batch, queue_size=batch * 4, num_workers=workers, print_freq=1000)
    config['schedular']['epochs'] = 1
    path = os.path.join(directory, 'Pretrain.yaml')
    with open(path, 'w') as f:
        YAML(typ='safe').dump(config, f)
    return path


def seconds_per_step(config, out, threads):
    env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
    command = [sys.executable, os.path.join(ROOT, 'Pretrain.py'), '--config', config, '--output_dir', out,
               '--device', 'cpu', '--overwrite']
    if threads is not None:
        command += ['--num_threads', str(threads)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-2000:])
    return float(re.search(r'Total time: \S+ \(([\d.]+) s / it\)', result.stdout).group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=10, help='training steps per run (default 10)')
    parser.add_argument('--workers', type=int, default=2, help='loader workers, as in the demo config (default 2)')
    args = parser.parse_args()
    import engine.run
    cores = len(os.sched_getaffinity(0))
    chosen = engine.run.default_threads(args.workers)
    settings = [(f'default choice ({chosen})', None)]
    settings += [(name, n) for name, n in ((f'every core ({cores})', cores), ('one thread', 1)) if n != chosen]
    print(f'demo pre-training, {args.steps} steps, {args.workers} loader workers, {cores} cores in the affinity mask')
    print(f"{'intra-op threads':<24}{'idle s/step':>12}{'loaded s/step':>15}{'slow-down':>11}", flush=True)
    with tempfile.TemporaryDirectory() as directory:
        config = make_config(directory, args.steps, args.workers)
        for name, threads in settings:
            idle = seconds_per_step(config, os.path.join(directory, 'out'), threads)
            load = [multiprocessing.Process(target=busy, daemon=True) for _ in range(cores)]
            for process in load:
                process.start()
            try:
                loaded = seconds_per_step(config, os.path.join(directory, 'out'), threads)
            finally:
                for process in load:
                    process.terminate()
            print(f'{name:<24}{idle:>12.3f}{loaded:>15.3f}{loaded / idle:>10.1f}x', flush=True)


if __name__ == '__main__':
    main()
