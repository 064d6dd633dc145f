"""Is the pre-training step launch-bound? torch.profiler over a few default-path steps: host time per
step (until the step's last kernel is queued) against GPU time per step (the kernels' own time),
and the 15 most expensive kernels. One JSON line.

    python benchmarks/step_profile.py --size base --amp bf16          # on a GPU (gpu_check.sh runs it)
    python benchmarks/step_profile.py --size tiny --device cpu        # CPU: operators instead of kernels

Host time >= GPU time means the GPU waits for the host to launch kernels (fewer, larger kernels,
or CUDA graphs, would help); GPU time > host time means it is compute- or memory-bound.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as ts  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', choices=sorted(ts.SIZES), default='base')
    parser.add_argument('--batch', type=int, default=None)
    parser.add_argument('--amp', choices=('off', 'bf16', 'fp16'), default='bf16')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch or ts.SIZES[args.size]['batch']
    config = ts.model_config(args.size)
    model, optimizer = ts.build('default', config, device)
    image, text = ts.fixed_batch(config, batch)
    image = image.to(device)
    cuda = device.type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        ts.step(model, optimizer, image, text, args.amp, device)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    host = []
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            start = time.perf_counter()
            ts.step(model, optimizer, image, text, args.amp, device)
            host.append(time.perf_counter() - start)  # (nothing in the step waits for the GPU)
        sync()
    events = prof.key_averages()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        key = 'self_device_time_total'
    else:
        kernels = [e for e in events if e.self_cpu_time_total > 0]
        key = 'self_cpu_time_total'
    kernels.sort(key=lambda e: getattr(e, key), reverse=True)
    gpu_ms = sum(getattr(e, key) for e in kernels) / 1000 / args.steps if cuda else None
    row = {'size': args.size, 'batch': batch, 'amp': args.amp, 'device': str(device),
           'host_ms_per_step': 1000 * sorted(host)[len(host) // 2], 'gpu_ms_per_step': gpu_ms,
           'kernel_launches_per_step': sum(e.count for e in kernels) / args.steps,
           'top_15': [{'name': e.key[:120], 'calls_per_step': e.count / args.steps,
                       'ms_per_step': getattr(e, key) / 1000 / args.steps} for e in kernels[:15]]}
    row['launch_bound'] = None if gpu_ms is None else row['host_ms_per_step'] >= gpu_ms
    print(json.dumps(row))


if __name__ == '__main__':
    main()
