#!/usr/bin/env bash
# The first measurements on a GPU, in one go (at most about 8 minutes on one H100/H200):
#
#   benchmarks/gpu_check.sh [OUT.json]            # on a CUDA machine; writes gpu_check.json by default
#   benchmarks/gpu_check.sh --dry-run [OUT.json]  # the same steps at tiny sizes on the CPU (a test runs it)
#
# 0. the imports it needs, first: a python that lacks any stops at once with one line naming them
#    (ruamel.yaml and webdataset: benchmarks/gpu_wheels.sh fetches and installs them into .whl/)
# 1. versions: torch, CUDA, cuDNN, GPU name and count
# 2. the pre-training step (benchmarks/train_step.py) at ViT-B/16 256 px, BERT-base, batch 64, bf16:
#    the default path, the plain (original-style) fp32 path with TF32, and the default path with
#    regional torch.compile; the FLOPs of each path are counted for its exact inputs (FlopCounterMode)
# 3. benchmarks/step_profile.py: host time and GPU time per step, the 15 most expensive kernels
# 4. benchmarks/sync_check.py: pre-training steps 2-3 under torch.cuda.set_sync_debug_mode('error')
# 5. the real loader (JSON path: JPEG decode, crop, RandomAugment) at 14 workers, against the step
# 6. peak memory of the default path at batch 64 and 128, with and without --grad_checkpointing
# 7. retrieval re-ranking (benchmarks/retrieval_eval.py) at MSCOCO 5k base size, bf16 and fp32
# 8. last, in the time left: the step compiled whole (--compile step: forward and backward, optimizer
#    step with a tensor lr, CUDA graphs), train_step.py's compile_step path
#
# The whole check stops after 8 minutes (GPU_CHECK_BUDGET seconds, 480): each part has its own
# time limit, cut to what is left; parts that no longer fit are recorded as 'cut'. A part that
# fails or runs out of time is recorded as such; the rest still run. One JSON file: pairs/s, MFU
# (pairs/s x the counted FLOPs per pair over the card's dense peak: bf16 for the bf16 paths, TF32
# for the fp32 plain path; H100 SXM, PCIe and NVL apart; GPU_PEAK_TFLOPS overrides the bf16 peak),
# ms/step, peak memory, the profile, the loader's pairs/s.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0
OUT=gpu_check.json
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) OUT=$arg ;;
  esac
done
# wheels installed by benchmarks/gpu_wheels.sh (for a machine without a package registry)
[ -d .whl/site ] && export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
MISSING=$("$PY" -c 'import importlib.util as u
names = ["torch", "numpy", "PIL", "cv2", "timm", "transformers", "ruamel.yaml", "webdataset", "safetensors"]
def found(n):
    try:
        return u.find_spec(n) is not None
    except ImportError:
        return False
print(", ".join(n for n in names if not found(n)))' 2>&1) || MISSING="python ($PY) did not run: $MISSING"
if [ -n "$MISSING" ]; then
  echo "error: $PY lacks $MISSING; on a machine with the package registry run benchmarks/gpu_wheels.sh download, then here benchmarks/gpu_wheels.sh install" | tr -s '\n' ' ' >&2
  echo >&2
  exit 2
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
BUDGET=${GPU_CHECK_BUDGET:-480}
START=$SECONDS

if [ "$DRY" = 1 ]; then
  # tiny sizes on the CPU; compiling is left out (minutes of C++ compilation on a CPU)
  DEV=cpu; SIZE=tiny; AMP=off; B1=4; B2=8; STEPS=1; WARM=1; PATHS="default plain"
  STEPLIMIT=600; COMPILELIMIT=0; MEMLIMIT=600; RETLIMIT=600; SYNCLIMIT=600; PROFLIMIT=600; LOADLIMIT=600
  LOAD_ARGS="--workers 2 --images 16 --rounds 1 --batch 8"; BUDGET=${GPU_CHECK_BUDGET:-3600}; PROFSTEPS=1
  RET_ARGS="--device cpu --size small --images 40 --texts 200 --k_test 8 --queries 1"
else
  # time limits (s) that add up to about 8 minutes; most parts end well before theirs
  DEV=cuda; SIZE=base; AMP=bf16; B1=64; B2=128; STEPS=10; WARM=3; PATHS="default plain compile"
  STEPLIMIT=60; COMPILELIMIT=150; MEMLIMIT=35; RETLIMIT=30; SYNCLIMIT=40; PROFLIMIT=45; LOADLIMIT=45
  LOAD_ARGS="--workers 14 --images 448 --rounds 2"; PROFSTEPS=3
  RET_ARGS="--device cuda --size base"
fi

part() {  # part NAME LIMIT COMMAND...: run with a time limit (cut to the budget left), keep stdout and status
  local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START))); shift 2
  if [ "$left" -lt 15 ]; then
    echo "== $name: cut (the ${BUDGET} s budget is spent)" >&2; echo cut > "$TMP/$name.rc"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s): $*" >&2
  timeout "$limit" "$@" > "$TMP/$name.out" 2> "$TMP/$name.err"
  echo $? > "$TMP/$name.rc"
  tail -n 3 "$TMP/$name.err" >&2
}

"$PY" - > "$TMP/env.json" <<'PYEOF'
import json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps({
    'torch': torch.__version__, 'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(),
    'python': platform.python_version(), 'gpu': torch.cuda.get_device_name(0) if cuda else None,
    'gpu_count': torch.cuda.device_count() if cuda else 0,
    'bf16_supported': bool(cuda and torch.cuda.is_bf16_supported())}))
PYEOF

# each path in its own process, under its own limit (train_step.py --one: one path, one JSON line)
STEP="benchmarks/train_step.py --size $SIZE --amp $AMP --device $DEV --one"
for path in $PATHS; do
  limit=$STEPLIMIT; [ "$path" = compile ] && limit=$COMPILELIMIT
  part "step_$path" "$limit" "$PY" $STEP "$path" --batch "$B1" --steps "$STEPS" --warmup "$WARM" --flops
  if [ "$path" = plain ]; then  # the parts that say where the time goes, before compiling
    part profile "$PROFLIMIT" "$PY" benchmarks/step_profile.py --size "$SIZE" --amp "$AMP" --device "$DEV" \
      --batch "$B1" --steps "$PROFSTEPS" --warmup "$WARM"
    part sync "$SYNCLIMIT" "$PY" benchmarks/sync_check.py --size "$SIZE" --amp "$AMP"
    part loader "$LOADLIMIT" "$PY" benchmarks/data_loader.py --sizes 640x480 $LOAD_ARGS
  fi
done
if [ "$DRY" = 0 ]; then  # (the dry run keeps one memory part and one precision: each part is a process start)
  part mem_b1 "$MEMLIMIT" "$PY" $STEP default --batch "$B1" --steps 1 --warmup 1
  part mem_b2 "$MEMLIMIT" "$PY" $STEP default --batch "$B2" --steps 1 --warmup 1
  part mem_b2_ckpt "$MEMLIMIT" "$PY" $STEP default --batch "$B2" --steps 1 --warmup 1 --grad_checkpointing
  part rerank_bf16 "$RETLIMIT" "$PY" benchmarks/retrieval_eval.py $RET_ARGS --dtype bf16
fi
part mem_b1_ckpt "$MEMLIMIT" "$PY" $STEP default --batch "$B1" --steps 1 --warmup 1 --grad_checkpointing
part rerank_fp32 "$RETLIMIT" "$PY" benchmarks/retrieval_eval.py $RET_ARGS --dtype fp32
if [ "$DRY" = 0 ]; then  # last: it gets what the budget has left, and is recorded as cut otherwise
  part step_compile_step "$COMPILELIMIT" "$PY" $STEP compile_step --batch "$B1" --steps "$STEPS" --warmup "$WARM" --flops
fi

DRY=$DRY TMP=$TMP OUT=$OUT "$PY" - <<'PYEOF'
import json, os
tmp, out = os.environ['TMP'], os.environ['OUT']
# dense peaks (TFLOP/s): (bf16, TF32), first match in the GPU's name wins (H100 SXM's name is
# 'NVIDIA H100 80GB HBM3': the PCIe and NVL boards are matched first)
PEAKS = {'H200': (989, 495), 'H100 NVL': (835, 418), 'H100 PCIe': (756, 378), 'H100': (989, 495),
         'A100': (312, 156), 'L40S': (362, 183), 'A10G': (125, 62.5)}

def read(name):
    path = os.path.join(tmp, name)
    return open(path).read() if os.path.exists(path) else ''

def rows(name):
    return [json.loads(line) for line in read(name).splitlines() if line.strip()]

env = json.loads(read('env.json'))
peaks = next((v for k, v in PEAKS.items() if env['gpu'] and k in env['gpu']), (None, None))
peak = float(os.environ.get('GPU_PEAK_TFLOPS') or 0) or peaks[0]
peak_tf32 = peaks[1] if peak == peaks[0] else None
status = {}
for name in ('step_default', 'step_plain', 'profile', 'sync', 'loader', 'step_compile', 'mem_b1', 'mem_b2',
             'mem_b1_ckpt', 'mem_b2_ckpt', 'rerank_bf16', 'rerank_fp32', 'step_compile_step'):
    rc = read(f'{name}.rc').strip()
    if not rc:
        status[name] = 'not run (dry run)'
        continue
    status[name] = 'ok' if rc == '0' else ('timed out' if rc == '124' else 'cut: the time budget was spent'
                                           if rc == 'cut' else f'failed (exit {rc}): '
                                           + (read(f'{name}.err').strip().splitlines() or [''])[-1])
step = []
for r in (rows('step_default.out') + rows('step_compile.out') + rows('step_compile_step.out')
          + rows('step_plain.out')):
    r['pairs_per_s'] = r.pop('samples_per_s')
    fp32 = r['path'] == 'plain' or r['amp'] == 'off'
    r['peak_tflops'] = peak_tf32 if fp32 else peak  # the plain path runs float32 on TF32 tensor cores
    r['mfu'] = (r['pairs_per_s'] * r['flop_per_pair'] / (r['peak_tflops'] * 1e12)
                if r['peak_tflops'] and r.get('flop_per_pair') else None)
    step.append(r)
profile = rows('profile.out')
loader = rows('loader.out')
default = [r for r in step if r['path'] == 'default']
if loader and default:
    loader[-1]['step_pairs_per_s'] = default[0]['pairs_per_s']
    loader[-1]['loader_keeps_up'] = loader[-1]['loader_pairs_per_s'] >= default[0]['pairs_per_s']
memory = [{k: r[k] for k in ('batch', 'grad_checkpointing', 'peak_memory_gib', 'ms_per_step')}
          for name in ('mem_b1', 'mem_b1_ckpt', 'mem_b2', 'mem_b2_ckpt') for r in rows(f'{name}.out')]
sync = rows('sync.out')
result = {'dry_run': os.environ['DRY'] == '1', 'environment': env, 'peak_bf16_tflops': peak,
          'peak_tf32_tflops': peak_tf32, 'train_step': step, 'memory': memory,
          'profile': profile[-1] if profile else None, 'loader': loader[-1] if loader else None,
          'rerank': {d: read(f'rerank_{d}.out').strip().splitlines() for d in ('bf16', 'fp32')},
          'sync_check': sync[-1] if sync else None, 'parts': status}
with open(out, 'w') as f:
    json.dump(result, f, indent=1)
for r in step:
    mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] is not None else 'n/a'
    print(f"{r['path']:8} {r['amp']:5} batch {r['batch']}: {r['pairs_per_s']:.1f} pairs/s, "
          f"{r['ms_per_step']:.1f} ms/step, peak {r['peak_memory_gib']:.2f} GiB, "
          f"{(r.get('flop_per_pair') or 0) / 1e9:.1f} GFLOP/pair, MFU {mfu}")
if profile:
    p = profile[-1]
    print(f"profile: host {p['host_ms_per_step']:.1f} ms/step, GPU "
          f"{'n/a' if p['gpu_ms_per_step'] is None else format(p['gpu_ms_per_step'], '.1f')} ms/step, "
          f"{p['kernel_launches_per_step']:.0f} launches/step, launch-bound: {p['launch_bound']}")
if loader:
    print(f"loader: {loader[-1]['loader_pairs_per_s']:.1f} pairs/s with {loader[-1]['workers']} workers"
          + (f" (the step: {loader[-1]['step_pairs_per_s']:.1f})" if 'step_pairs_per_s' in loader[-1] else ''))
for r in memory:
    print(f"memory: batch {r['batch']}{' (grad checkpointing)' if r['grad_checkpointing'] else ''}: "
          f"{r['peak_memory_gib']:.2f} GiB")
print('sync check:', (sync[-1] if sync else {}).get('sync_check'), '| parts:', status)
print('written:', out)
PYEOF
