#!/usr/bin/env bash
# The first measurements on a GPU, in one go (at most about 8 minutes on one H100/H200):
#
#   benchmarks/gpu_check.sh [OUT.json]            # on a CUDA machine; writes gpu_check.json by default
#   benchmarks/gpu_check.sh --dry-run [OUT.json]  # the same steps at tiny sizes on the CPU (a test runs it)
#
# 1. versions: torch, CUDA, cuDNN, GPU name and count
# 2. the pre-training step (benchmarks/train_step.py) at ViT-B/16 256 px, BERT-base, batch 64, bf16:
#    the default path, the default path with regional torch.compile, and the plain (original-style)
#    fp32 path
# 3. peak memory of the default path at batch 64 and 128, each with and without --grad_checkpointing
# 4. retrieval re-ranking (benchmarks/retrieval_eval.py) at MSCOCO 5k base size, bf16 and fp32
# 5. benchmarks/sync_check.py: pre-training steps 2-3 under torch.cuda.set_sync_debug_mode('error')
#
# Each part has its own time limit and a part that fails or runs out of time is recorded as such;
# the rest still run. One JSON file: pairs/s, MFU (0.28 TFLOP per pre-training pair over the
# card's dense bf16 peak; set GPU_PEAK_TFLOPS for a card not in the table), ms/step, peak memory.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0
OUT=gpu_check.json
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) OUT=$arg ;;
  esac
done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if [ "$DRY" = 1 ]; then
  # tiny sizes on the CPU; compiling is left out (minutes of C++ compilation on a CPU)
  DEV=cpu; SIZE=tiny; AMP=off; B1=4; B2=8; STEPS=1; WARM=1; PATHS="plain default"
  STEPLIMIT=600; COMPILELIMIT=0; MEMLIMIT=600; RETLIMIT=600; SYNCLIMIT=600
  RET_ARGS="--device cpu --size small --images 40 --texts 200 --k_test 8 --queries 1"
else
  # time limits (s) that add up to about 8 minutes; most parts end well before theirs
  DEV=cuda; SIZE=base; AMP=bf16; B1=64; B2=128; STEPS=10; WARM=3; PATHS="default compile plain"
  STEPLIMIT=45; COMPILELIMIT=150; MEMLIMIT=35; RETLIMIT=30; SYNCLIMIT=40
  RET_ARGS="--device cuda --size base"
fi

part() {  # part NAME LIMIT COMMAND...: run with a time limit, keep stdout and the exit status
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" >&2
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
  part "step_$path" "$limit" "$PY" $STEP "$path" --batch "$B1" --steps "$STEPS" --warmup "$WARM"
done
if [ "$DRY" = 0 ]; then  # (the dry run keeps one memory part and one precision: each part is a process start)
  part mem_b1 "$MEMLIMIT" "$PY" $STEP default --batch "$B1" --steps 1 --warmup 1
  part mem_b2 "$MEMLIMIT" "$PY" $STEP default --batch "$B2" --steps 1 --warmup 1
  part mem_b2_ckpt "$MEMLIMIT" "$PY" $STEP default --batch "$B2" --steps 1 --warmup 1 --grad_checkpointing
  part rerank_bf16 "$RETLIMIT" "$PY" benchmarks/retrieval_eval.py $RET_ARGS --dtype bf16
fi
part mem_b1_ckpt "$MEMLIMIT" "$PY" $STEP default --batch "$B1" --steps 1 --warmup 1 --grad_checkpointing
part rerank_fp32 "$RETLIMIT" "$PY" benchmarks/retrieval_eval.py $RET_ARGS --dtype fp32
part sync "$SYNCLIMIT" "$PY" benchmarks/sync_check.py --size "$SIZE" --amp "$AMP"

DRY=$DRY TMP=$TMP OUT=$OUT "$PY" - <<'PYEOF'
import json, os
tmp, out = os.environ['TMP'], os.environ['OUT']
FLOP_PER_PAIR = 0.28e12  # one ALBEF-base pre-training pair: online and momentum encoders, three fusion passes
PEAK_BF16_TFLOPS = {'H200': 989, 'H100 PCIe': 756, 'H100': 989, 'A100': 312, 'L40S': 362, 'A10G': 125}

def read(name):
    path = os.path.join(tmp, name)
    return open(path).read() if os.path.exists(path) else ''

def rows(name):
    return [json.loads(line) for line in read(name).splitlines() if line.strip()]

env = json.loads(read('env.json'))
peak = os.environ.get('GPU_PEAK_TFLOPS')
if peak is None and env['gpu']:
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in env['gpu']), None)
peak = float(peak) if peak else None
status = {}
for name in ('step_default', 'step_compile', 'step_plain', 'mem_b1', 'mem_b2', 'mem_b1_ckpt', 'mem_b2_ckpt',
             'rerank_bf16', 'rerank_fp32', 'sync'):
    rc = read(f'{name}.rc').strip()
    if not rc:
        status[name] = 'not run (dry run)'
        continue
    status[name] = 'ok' if rc == '0' else ('timed out' if rc == '124' else f'failed (exit {rc}): '
                                           + (read(f'{name}.err').strip().splitlines() or [''])[-1])
step = []
for r in rows('step_default.out') + rows('step_compile.out') + rows('step_plain.out'):
    r['pairs_per_s'] = r.pop('samples_per_s')
    r['mfu'] = r['pairs_per_s'] * FLOP_PER_PAIR / (peak * 1e12) if peak else None
    step.append(r)
memory = [{k: r[k] for k in ('batch', 'grad_checkpointing', 'peak_memory_gib', 'ms_per_step')}
          for name in ('mem_b1', 'mem_b1_ckpt', 'mem_b2', 'mem_b2_ckpt') for r in rows(f'{name}.out')]
sync = rows('sync.out')
result = {'dry_run': os.environ['DRY'] == '1', 'environment': env, 'peak_bf16_tflops': peak,
          'flop_per_pair': FLOP_PER_PAIR, 'train_step': step, 'memory': memory,
          'rerank': {d: read(f'rerank_{d}.out').strip().splitlines() for d in ('bf16', 'fp32')},
          'sync_check': sync[-1] if sync else None, 'parts': status}
with open(out, 'w') as f:
    json.dump(result, f, indent=1)
for r in step:
    mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] is not None else 'n/a'
    print(f"{r['path']:8} {r['amp']:5} batch {r['batch']}: {r['pairs_per_s']:.1f} pairs/s, "
          f"{r['ms_per_step']:.1f} ms/step, peak {r['peak_memory_gib']:.2f} GiB, MFU {mfu}")
for r in memory:
    print(f"memory: batch {r['batch']}{' (grad checkpointing)' if r['grad_checkpointing'] else ''}: "
          f"{r['peak_memory_gib']:.2f} GiB")
print('sync check:', (sync[-1] if sync else {}).get('sync_check'), '| parts:', status)
print('written:', out)
PYEOF
