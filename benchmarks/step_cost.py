"""Count what one pre-training step costs, without running it: FLOPs per image-text pair,
dispatched operators, BERT layer calls and the bytes the momentum update writes.

    python benchmarks/step_cost.py                        # base size (configs/Pretrain.yaml), batch 64
    python benchmarks/step_cost.py --root /path/to/tree   # count another checkout of this repository
    python benchmarks/step_cost.py --size small --json cost.json

The model is built on the meta device (shapes, no memory, no arithmetic), so the base size counts in
seconds on any machine. The images are meta tensors; the captions are CPU tensors as the loader
delivers them (8 to 25 word pieces, padded to the longest, as the tokenizer returns them), so
what the model does on the host (the MLM masks) runs for real. Counted for forward + backward (the
optimizer is fused AdamW on a GPU: a few operators whatever the model):

  FLOPs      torch.utils.flop_counter.FlopCounterMode (matrix products and attention), per pair
  operators  every aten operator dispatched (TorchDispatchMode), views and the momentum update's
             operators included, views (aliases, no kernel) excluded
  layer calls  forward calls of BERT layers (online and momentum)
  momentum   bytes of the tensors the momentum update writes (outputs and in-place targets)

Paths: `default` (this repository), `plain` (benchmarks/train_step.py's PlainALBEF, as the original
computes). A meta tensor has no values, so the plain path's per-sample host reads (the
`.item()` of each negative, the queue pointer) are replaced by their batched equivalents here: its
FLOPs are exact, its operator count is a lower bound (the original adds about 3 per sample).
The default path skips padding (token packing: its index built on the host from the loader's CPU
mask, as on a GPU); `default-padded` runs every token through every layer, as under --compile.
"""
import argparse
import importlib.util
import json
import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))


def load_tree(root):
    """benchmarks/train_step.py of `root`, imported with `root` first on sys.path (its models)."""
    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location('train_step_of_tree', os.path.join(root, 'benchmarks',
                                                                                        'train_step.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Operators(TorchDispatchMode):
    """Counts the aten operators dispatched (views excluded) and the bytes of what they write."""

    def __init__(self):
        super().__init__()
        self.count, self.bytes_written, self.by_name = 0, 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.count += 1
            self.by_name[func.overloadpacket.__name__] += 1
            outs = out if isinstance(out, (list, tuple)) else [out]
            if func.overloadpacket.__name__.endswith('_') and out is None:  # in-place foreach: the targets
                outs = args[0]
            self.bytes_written += sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
        return out


def probe_batch(ts, config, batch_size, seed=0):
    """Meta images and CPU captions of 8 to 25 word pieces ([CLS] first), padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 26, (batch_size,), generator=g)
    width = int(lengths.max())
    attention_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    input_ids = torch.randint(1000, ts.VOCAB, (batch_size, width), generator=g) * attention_mask
    input_ids[:, 0] = ts.FakeTokenizer.cls_token_id
    image = torch.empty(batch_size, 3, config['image_res'], config['image_res'], device='meta')
    return image, ts.Text(input_ids, attention_mask), lengths


def countable_plain(ts):
    """PlainALBEF with its host reads (per-sample .item(), the queue pointer) done batched."""
    from models import base as albef_base
    import torch.nn.functional as F
    from models.losses import mlm_loss, sample_negatives  # batched (plain_path swaps the models' for a per-sample loop)

    class Counted(ts.PlainALBEF):
        def forward(self, image, text, alpha=0):  # PlainALBEF.forward, the masks drawn on the CPU copy
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            input_ids = text.input_ids.clone()
            text = text.to(image.device)
            loss_ita, loss_itm, image_embeds, image_embeds_m = self.contrastive_forward(image, text, alpha)
            labels = input_ids.clone()
            input_ids, labels = self.mask(input_ids, self.text_encoder.config.vocab_size, image.device, targets=labels,
                                          probability_matrix=torch.full(labels.shape, self.mlm_probability))
            input_ids, labels = input_ids.to(image.device), labels.to(image.device)
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
            with torch.no_grad():
                logits_m = self.text_encoder_m(input_ids, attention_mask=text.attention_mask, return_logits=True,
                                               encoder_hidden_states=image_embeds_m, encoder_attention_mask=image_atts)
            logits = self.text_encoder(input_ids, attention_mask=text.attention_mask, return_logits=True,
                                       encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
            return mlm_loss(logits, labels, F.softmax(logits_m, dim=-1), alpha), loss_ita, loss_itm

        def _itm_loss(self, image_embeds, image_atts, text_embeds, text_atts, sim_i2t, sim_t2i, idx):
            bs = image_embeds.size(0)
            output_pos = self._fusion(text_embeds, text_atts, image_embeds, image_atts)
            with torch.no_grad():
                same = torch.eye(bs, dtype=torch.bool, device=image_embeds.device)
                neg_image = sample_negatives(albef_base.hard_negative_weights(sim_t2i[:, :bs], same))
                neg_text = sample_negatives(albef_base.hard_negative_weights(sim_i2t[:, :bs], same))
            text_embeds_all = torch.cat([text_embeds, text_embeds[neg_text]], dim=0)
            text_atts_all = torch.cat([text_atts, text_atts[neg_text]], dim=0)
            image_embeds_all = torch.cat([image_embeds[neg_image], image_embeds], dim=0)
            image_atts_all = torch.cat([image_atts, image_atts], dim=0)
            output_neg = self._fusion(text_embeds_all, text_atts_all, image_embeds_all, image_atts_all)
            vl_output = self.itm_head(torch.cat([output_pos, output_neg], dim=0))
            labels = (torch.arange(3 * bs, device=image_embeds.device) < bs).long()
            return torch.nn.functional.cross_entropy(vl_output, labels)

        @torch.no_grad()
        def _dequeue_and_enqueue(self, image_feat, text_feat, idx=None):
            albef_base.ALBEFBase._dequeue_and_enqueue(self, image_feat, text_feat, idx)

    return Counted


class _autocast_or_nothing(torch.autocast):
    """torch.autocast, and no context for the meta device (autocast has no dtype for it)."""

    def __init__(self, device_type, *args, **kwargs):
        self.meta = device_type == 'meta'
        if not self.meta:
            super().__init__(device_type, *args, **kwargs)

    def __enter__(self):
        return None if self.meta else super().__enter__()

    def __exit__(self, *exc):
        return None if self.meta else super().__exit__(*exc)




def count(ts, path, size, batch_size, padded=False):
    from models.xbert import BertLayer, BertModel
    config = ts.model_config(size)
    if size == 'base':
        config['queue_size'] = 65536  # configs/Pretrain.yaml
    torch.manual_seed(0)
    cls = countable_plain(ts) if path == 'plain' else ts.ALBEF
    with torch.device('meta'):
        model = cls(config=config, text_encoder=None, tokenizer=ts.FakeTokenizer(), init_deit=False)
    model.train()
    image, text, lengths = probe_batch(ts, config, batch_size)
    calls = Counter()
    hooks = [m.register_forward_pre_hook(lambda m, a: calls.update(['bert'])) for m in model.modules()
             if isinstance(m, BertLayer)]
    if padded:  # as under --compile (engine.build.compile_regions): every token through every layer
        for m in model.modules():
            if isinstance(m, BertModel):
                m.pack_tokens = False
    momentum = Operators()
    update = model._momentum_update

    def counted_update():
        with momentum:
            update()
    model._momentum_update = counted_update
    context = ts.plain_path() if path == 'plain' else ts._nothing()
    ops = Operators()
    flops = FlopCounterMode(display=False)
    saved, torch.autocast = torch.autocast, _autocast_or_nothing  # (the models' float32 sections use it)
    try:
        with context, flops, ops:
            losses = model(image, text, alpha=0.4)
            sum(losses).backward()
    finally:
        torch.autocast = saved
    for h in hooks:
        h.remove()
    return {'path': path + ('-padded' if padded else ''), 'size': size, 'batch': batch_size,
            'text_length': int(text.input_ids.size(1)), 'mean_tokens': float(lengths.float().mean()),
            'gflop_per_pair': flops.get_total_flops() / batch_size / 1e9, 'operators': ops.count,
            'bert_layer_calls': calls['bert'], 'momentum_bytes_written': momentum.bytes_written,
            'momentum_operators': momentum.count}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--root', default=os.path.dirname(HERE), help='the checkout whose models are counted')
    parser.add_argument('--size', choices=('tiny', 'small', 'base'), default='base')
    parser.add_argument('--batch', type=int, default=None, help='default: 64 (base), 32 (small), 16 (tiny)')
    parser.add_argument('--paths', default='plain,default-padded,default',
                        help="comma-separated: plain, default, default-padded (no token packing, as --compile)")
    parser.add_argument('--json', help='append the rows as JSON lines to this file')
    args = parser.parse_args()
    ts = load_tree(os.path.abspath(args.root))
    batch = args.batch or ts.SIZES[args.size]['batch']
    rows = []
    for path in args.paths.split(','):
        rows.append(count(ts, path.replace('-padded', ''), args.size, batch, padded=path.endswith('-padded')))
    print(f'{args.size} pre-training step, batch {batch}, captions of 8-25 word pieces padded to '
          f'{rows[0]["text_length"]} (mean {rows[0]["mean_tokens"]:.1f}); tree {os.path.abspath(args.root)}')
    print(f"{'path':14} {'GFLOP/pair':>10} {'operators':>9} {'BERT layer calls':>16} {'momentum MB written':>19}")
    for r in rows:
        print(f"{r['path']:14} {r['gflop_per_pair']:10.1f} {r['operators']:9d} {r['bert_layer_calls']:16d} "
              f"{r['momentum_bytes_written'] / 1e6:19.0f}")
    if args.json:
        with open(args.json, 'a') as f:
            for r in rows:
                f.write(json.dumps(r) + '\n')


if __name__ == '__main__':
    main()
