"""Time pre-training steps (forward, backward, optimizer) of our default path against a plain one.

    python benchmarks/train_step.py --size small                      # CPU: fp32
    python benchmarks/train_step.py --size base --amp bf16            # GPU: ViT-B/16 at 256 px, batch 64
    python benchmarks/train_step.py --size small --paths default      # one path only
    python benchmarks/train_step.py --size base --amp bf16 --paths default,compile --grad_checkpointing
    python benchmarks/train_step.py --size base --amp bf16 --paths default,compile_step

Both paths build the same pre-training model from the same seed and compute the same losses (a
test holds them to float32 tolerance). They differ only in how:

  plain     what the original does: attention as explicit softmax(QK^T)V, the MLM head over every
            token, hard negatives drawn one sample at a time with .item() and stacked sample by
            sample, ITM in two fusion passes (3B image copies), the queue pointer read back to the
            host, a for-loop AdamW, float32
  compile   the default path with every ViT block and BERT layer torch.compile'd in place
            (engine.build.compile_regions, as --compile does); the first steps include compiling
  compile_step  the default path compiled as --compile step does: the whole model's forward and
            backward (engine.build.compile_model), and the optimizer step with a tensor lr
            (engine.build.make_optimizer_step); CUDA graphs on CUDA
  default   this repository: scaled_dot_product_attention, the MLM head on the masked tokens
            only, one batched multinomial per direction, ITM in one fusion pass that projects
            each image's cross-attention keys and values once, BERT's linear layers on the real
            tokens only (training on the CPU), no host synchronisation, fused AdamW where
            supported, and --amp bf16|fp16 on GPUs

Each path runs in its own process (so peak memory is its own), warms up, then times --steps steps.
Printed: samples per second, milliseconds per step, peak memory, and the ratio of the two paths.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from models import base as albef_base  # noqa: E402
from models.losses import mlm_loss  # noqa: E402
from models.model_pretrain import ALBEF  # noqa: E402
from models.tokenization_bert import TokenizerOutput  # noqa: E402
from models.xbert import BertConfig, BertModel  # noqa: E402

SIZES = {
    # vision (width, depth, heads, image_res), BERT (width, layers, fusion_layer, heads), batch
    'tiny': dict(vision=(64, 2, 4, 64), bert=(64, 4, 2, 4), batch=16),
    'small': dict(vision=(384, 6, 6, 128), bert=(384, 6, 3, 12), batch=32),
    'base': dict(vision=(768, 12, 12, 256), bert=(768, 12, 6, 12), batch=64),
}
TEXT_LENGTH = 30
VOCAB = 30522


class FakeTokenizer:
    """The ids the pre-training model's masking needs ([PAD]=0, [CLS]=101, [MASK]=103)."""
    pad_token_id, cls_token_id, mask_token_id = 0, 101, 103


def Text(input_ids, attention_mask):
    """A tokenised batch, as the tokenizer returns it (a dict with attribute access and `.to`)."""
    return TokenizerOutput(input_ids=input_ids, attention_mask=attention_mask)


def model_config(size):
    (v_width, v_depth, v_heads, res), (t_width, layers, fusion, t_heads) = SIZES[size]['vision'], SIZES[size]['bert']
    bert = BertConfig(vocab_size=VOCAB, hidden_size=t_width, num_hidden_layers=layers, num_attention_heads=t_heads,
                      intermediate_size=4 * t_width, max_position_embeddings=512).to_dict()
    bert.update(fusion_layer=fusion, encoder_width=v_width)
    batch = SIZES[size]['batch']
    return dict(bert_config=bert, image_res=res, patch_size=16, vision_width=v_width, vision_depth=v_depth,
                vision_num_heads=v_heads, embed_dim=256, temp=0.07, mlm_probability=0.15,
                queue_size=batch * 16, momentum=0.995, alpha=0.4)


def fixed_batch(config, batch_size, seed=0):
    """Random images and captions of 8..TEXT_LENGTH tokens ([CLS] first, padding after)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, 3, config['image_res'], config['image_res'], generator=g)
    lengths = torch.randint(8, TEXT_LENGTH + 1, (batch_size,), generator=g)
    attention_mask = (torch.arange(TEXT_LENGTH)[None] < lengths[:, None]).long()
    input_ids = torch.randint(1000, VOCAB, (batch_size, TEXT_LENGTH), generator=g) * attention_mask
    input_ids[:, 0] = FakeTokenizer.cls_token_id
    return image, Text(input_ids, attention_mask)


# ---- the plain path ------------------------------------------------------------------------------
def explicit_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """softmax(Q K^T * scale + mask) V written out, as the original computes attention."""
    scores = query @ key.transpose(-2, -1) * (scale if scale is not None else query.size(-1) ** -0.5)
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float('-inf'))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float('-inf')) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return probs @ value


def per_sample_negatives(weights):
    """The original's loop: one multinomial per row, each read back with .item()."""
    return torch.tensor([torch.multinomial(w, 1).item() for w in weights], device=weights.device)


class PlainALBEF(ALBEF):
    """The pre-training model computed as the original does (same parameters, same losses)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for module in self.modules():
            if isinstance(module, BertModel):
                module.pack_tokens = False  # every token, padding included, through every layer

    def forward(self, image, text, alpha=0):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        text = text.to(image.device)
        loss_ita, loss_itm, image_embeds, image_embeds_m = self.contrastive_forward(image, text, alpha)
        input_ids = text.input_ids.clone()
        labels = input_ids.clone()
        probability_matrix = torch.full(labels.shape, self.mlm_probability)
        input_ids, labels = self.mask(input_ids, self.text_encoder.config.vocab_size, image.device,
                                      targets=labels, probability_matrix=probability_matrix)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        with torch.no_grad():
            logits_m = self.text_encoder_m(input_ids, attention_mask=text.attention_mask,
                                           encoder_hidden_states=image_embeds_m, encoder_attention_mask=image_atts,
                                           return_logits=True)
        logits = self.text_encoder(input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                                   encoder_attention_mask=image_atts, return_logits=True)
        loss_mlm = mlm_loss(logits, labels, F.softmax(logits_m, dim=-1), alpha)  # over every token's logits
        return loss_mlm, loss_ita, loss_itm

    def _itm_loss(self, image_embeds, image_atts, text_embeds, text_atts, sim_i2t, sim_t2i, idx):
        """Two fusion passes (B positives, then 2B negatives gathered sample by sample)."""
        bs = image_embeds.size(0)
        output_pos = self._fusion(text_embeds, text_atts, image_embeds, image_atts)
        with torch.no_grad():
            same = torch.eye(bs, dtype=torch.bool, device=image_embeds.device)
            weights_i2t = albef_base.hard_negative_weights(sim_i2t[:, :bs], same, self.itm_eps)
            weights_t2i = albef_base.hard_negative_weights(sim_t2i[:, :bs], same, self.itm_eps)
            neg_image = albef_base.sample_negatives(weights_t2i)
            neg_text = albef_base.sample_negatives(weights_i2t)
        image_embeds_neg = torch.stack([image_embeds[int(b)] for b in neg_image])
        text_embeds_neg = torch.stack([text_embeds[int(b)] for b in neg_text])
        text_atts_neg = torch.stack([text_atts[int(b)] for b in neg_text])
        text_embeds_all = torch.cat([text_embeds, text_embeds_neg], dim=0)
        text_atts_all = torch.cat([text_atts, text_atts_neg], dim=0)
        image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
        image_atts_all = torch.cat([image_atts, image_atts], dim=0)
        output_neg = self._fusion(text_embeds_all, text_atts_all, image_embeds_all, image_atts_all)
        vl_output = self.itm_head(torch.cat([output_pos, output_neg], dim=0))
        itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)])
        return F.cross_entropy(vl_output, itm_labels.to(image_embeds.device))

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat, text_feat, idx=None):
        batch_size = image_feat.shape[0]
        ptr = int(self.queue_ptr)
        self.image_queue[:, ptr:ptr + batch_size] = image_feat.T
        self.text_queue[:, ptr:ptr + batch_size] = text_feat.T
        self.queue_ptr[0] = (ptr + batch_size) % self.queue_size


class plain_path:
    """Context: explicit attention and per-sample negative sampling everywhere in the models
    (PlainALBEF itself turns off the skipping of padding tokens)."""

    def __enter__(self):
        self.saved = F.scaled_dot_product_attention, albef_base.sample_negatives
        F.scaled_dot_product_attention = explicit_attention
        albef_base.sample_negatives = per_sample_negatives

    def __exit__(self, *exc):
        F.scaled_dot_product_attention, albef_base.sample_negatives = self.saved


def build(path, config, device, seed=0, grad_checkpointing=False):
    torch.manual_seed(seed)
    cls = PlainALBEF if path == 'plain' else ALBEF
    model = cls(config=config, text_encoder=None, tokenizer=FakeTokenizer(), init_deit=False).to(device)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if path == 'compile':
        import engine.build
        engine.build.compile_regions(model)
    from optim import create_optimizer
    optim_config = {'opt': 'adamW', 'lr': 1e-4, 'weight_decay': 0.02}
    if path == 'plain':
        optim_config['fused'] = False
    optimizer = create_optimizer(optim_config, model)
    if path == 'plain':
        for group in optimizer.param_groups:
            group['foreach'] = False
    if path == 'compile_step':
        import engine.build
        model = engine.build.compile_model(model, model, **engine.build.step_compile_options(device))
        optimizer = CompiledOptimizer(optimizer, device)
    return model, optimizer


class CompiledOptimizer:
    """The optimizer as --compile step steps it: engine.build.make_optimizer_step (lr a tensor)."""

    def __init__(self, optimizer, device):
        import types
        import engine.build
        run = types.SimpleNamespace(config={'compile': 'step'}, scaler=None, device=device)
        self.optimizer, self.step = optimizer, engine.build.make_optimizer_step(optimizer, run)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def step(model, optimizer, image, text, amp, device):
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp, torch.float32)
    with torch.autocast(device.type, dtype=dtype, enabled=amp != 'off'):
        losses = model(image, text, alpha=0.4)
        loss = sum(losses)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


def count_flops(path, config, image, text, amp, device):
    """FLOPs of one step of `path` for exactly these inputs (torch.utils.flop_counter, forward +
    backward), counted on an eager model; `compile` and `compile_step` pad every token (no token
    packing)."""
    from torch.utils.flop_counter import FlopCounterMode
    model, optimizer = build('plain' if path == 'plain' else 'default', config, device)
    if path in ('compile', 'compile_step'):
        for module in model.modules():
            if isinstance(module, BertModel):
                module.pack_tokens = False
    counter = FlopCounterMode(display=False)
    with (plain_path() if path == 'plain' else _nothing()), counter:
        step(model, optimizer, image, text, amp, device)
    del model, optimizer
    return counter.get_total_flops()


def time_path(path, size, amp, steps, warmup, device, batch_size, grad_checkpointing=False, flops=False):
    config = model_config(size)
    if device.type == 'cuda':  # TF32 matrix products for float32 (the plain path), as in training
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    flop_per_pair = None
    if flops:
        image, text = fixed_batch(config, batch_size)
        text_in = text.to(device) if path == 'plain' else text
        flop_per_pair = count_flops(path, config, image.to(device), text_in, amp, device) / batch_size
    model, optimizer = build(path, config, device, grad_checkpointing=grad_checkpointing)
    image, text = fixed_batch(config, batch_size)
    image = image.to(device)
    if path != 'plain':
        text_in = text  # left on the CPU: the model draws its MLM masks there
    else:
        text_in = text.to(device)
    context = plain_path() if path == 'plain' else _nothing()
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    with context:
        for _ in range(warmup):
            step(model, optimizer, image, text_in, amp, device)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step(model, optimizer, image, text_in, amp, device)
        sync()
        elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == 'cuda'
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {'path': path, 'size': size, 'amp': amp, 'device': str(device), 'batch': batch_size,
            'grad_checkpointing': grad_checkpointing,
            'ms_per_step': 1000 * elapsed / steps, 'samples_per_s': batch_size * steps / elapsed,
            'peak_memory_gib': peak / 2 ** 30, 'flop_per_pair': flop_per_pair}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', choices=sorted(SIZES), default='small')
    parser.add_argument('--batch', type=int, default=None, help='default: 32 (small), 64 (base)')
    parser.add_argument('--amp', choices=('off', 'bf16', 'fp16'), default='off',
                        help='precision of the default path (the plain path is always fp32)')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--paths', default='plain,default')
    parser.add_argument('--repeats', type=int, default=3, help='processes per path; the median is printed')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--grad_checkpointing', action='store_true', help='in the default and compile paths')
    parser.add_argument('--json', help='append the results as JSON lines to this file')
    parser.add_argument('--one', help=argparse.SUPPRESS)  # internal: time one path in this process
    parser.add_argument('--flops', action='store_true', help='with --one: also count the FLOPs of one step')
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch or SIZES[args.size]['batch']

    if args.one:
        amp = 'off' if args.one == 'plain' else args.amp
        print(json.dumps(time_path(args.one, args.size, amp, args.steps, args.warmup, device, batch,
                                   args.grad_checkpointing and args.one != 'plain', flops=args.flops)))
        return

    runs = {path: [] for path in args.paths.split(',')}
    for _ in range(args.repeats):  # the paths alternate, so a slow spell of the machine hits both
        for path in runs:
            command = [sys.executable, os.path.abspath(__file__), '--one', path, '--size', args.size, '--batch',
                       str(batch), '--amp', args.amp, '--steps', str(args.steps), '--warmup', str(args.warmup),
                       '--device', args.device] + (['--grad_checkpointing'] if args.grad_checkpointing else [])
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f'{path} path failed:\n{out.stderr}')
            runs[path].append(json.loads(out.stdout.strip().splitlines()[-1]))
    # the run with the median step time of each path
    results = [sorted(r, key=lambda x: x['ms_per_step'])[len(r) // 2] for r in runs.values()]
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    print(f'{args.size} pre-training step, batch {batch}, on {name}, torch {torch.__version__} '
          f'(median of {args.repeats} processes x {args.steps} steps per path)')
    print(f"{'path':8} {'precision':9} {'samples/s':>10} {'ms/step':>9} {'peak GiB':>9}")
    for r in results:
        print(f"{r['path']:8} {r['amp'] if r['path'] != 'plain' else 'fp32':9} {r['samples_per_s']:10.1f} "
              f"{r['ms_per_step']:9.1f} {r['peak_memory_gib']:9.2f}")
    by_path = {r['path']: r for r in results}
    if {'plain', 'default'} <= set(by_path):
        ratio = by_path['default']['ms_per_step'] / by_path['plain']['ms_per_step']
        print(f'default / plain step time: {ratio:.2f} ({1 / ratio:.2f}x the throughput)')
    if args.json:
        with open(args.json, 'a') as f:
            for r in results:
                f.write(json.dumps(r) + '\n')


if __name__ == '__main__':
    main()
