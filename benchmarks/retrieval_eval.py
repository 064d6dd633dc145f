"""Time the ITM re-ranking of retrieval evaluation at MSCOCO 5k test size on synthetic features.

    python benchmarks/retrieval_eval.py                 # ALBEF's size: BERT-base fusion layers, 577 image tokens
    python benchmarks/retrieval_eval.py --size small    # a quarter of the width, 145 image tokens

The evaluation re-ranks the top k_test=256 ITC candidates of 5,000 images (i2t) and 25,000 texts
(t2i): 7.68 million (image, text) fusion passes. Both paths below compute the same scores:

  one query at a time   the original's loop (written out below): one fusion pass of k pairs per
                        query, each pair with its own copy of the image tokens and an all-ones
                        image mask, texts padded to max_length
  batched               models.retrieval_eval.score_pairs: `pairs_per_pass` pairs per pass, ordered
                        by text-length bucket, image and length; each image's cross-attention keys
                        and values computed once per pass and read by all its texts as one query
                        sequence; the padding columns all texts of a pass share left out

Each path is timed on a sample of its real workload (i2t: a few image queries with all their
candidates; t2i: every pair of a few images, which is how the batched path groups the full run),
and pairs per second and the implied time for the whole evaluation are printed.
"""
import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.retrieval_eval import candidate_pairs, score_pairs  # noqa: E402
from models.xbert import BertConfig, BertModel  # noqa: E402

SIZES = {  # BERT width, layers, fusion_layer, heads, image tokens
    'base': dict(width=768, layers=12, fusion=6, heads=12, image_tokens=577),   # ALBEF at 384 px
    'small': dict(width=384, layers=6, fusion=3, heads=6, image_tokens=145),    # 192 px, 16 px patches
}


class Pool:
    """image_feats[i] for 5,000 synthetic images without holding them all: a pool indexed mod P."""

    def __init__(self, pool):
        self.pool = pool

    def __getitem__(self, index):
        return self.pool[index % self.pool.size(0)]


class Fusion(nn.Module):
    """The part of the retrieval model re-ranking uses: BERT's fusion layers and the ITM head."""

    def __init__(self, size):
        super().__init__()
        config = BertConfig(vocab_size=30522, hidden_size=size['width'], num_hidden_layers=size['layers'],
                            num_attention_heads=size['heads'], intermediate_size=4 * size['width'],
                            max_position_embeddings=512)
        config.fusion_layer, config.encoder_width = size['fusion'], size['width']
        self.text_encoder = BertModel(config, add_pooling_layer=False)
        self.itm_head = nn.Linear(size['width'], 2)


@torch.no_grad()
def one_query_at_a_time(model, image_feats, text_feats, text_atts, image_idx, text_idx, k):
    """The original's loop: per query, its k pairs in one fusion pass, the image tokens copied for
    every pair, an all-ones image mask, texts padded to the tokenizer's max_length."""
    scores = []
    for start in range(0, len(image_idx), k):
        images, texts = image_idx[start:start + k], text_idx[start:start + k]
        encoder_output = torch.stack([image_feats[int(i)] for i in images])
        encoder_att = torch.ones(encoder_output.shape[:2], dtype=torch.long, device=encoder_output.device)
        output = model.text_encoder(encoder_embeds=text_feats[texts], attention_mask=text_atts[texts],
                                    encoder_hidden_states=encoder_output, encoder_attention_mask=encoder_att,
                                    mode='fusion')
        scores.append(model.itm_head(output.last_hidden_state[:, 0, :])[:, 1])
    return torch.cat(scores)


def time_pairs(model, image_feats, text_feats, text_atts, image_idx, text_idx, device, **kwargs):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    if kwargs.get('share_images', True):
        score_pairs(model, image_feats, text_feats, text_atts, image_idx, text_idx, **kwargs)
    else:
        one_query_at_a_time(model, image_feats, text_feats, text_atts, image_idx, text_idx, kwargs['pairs_per_pass'])
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return len(image_idx) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--size', choices=SIZES, default='base')
    parser.add_argument('--images', type=int, default=5000)
    parser.add_argument('--texts', type=int, default=25000)
    parser.add_argument('--k_test', type=int, default=256)
    parser.add_argument('--text_len', type=int, default=30)
    parser.add_argument('--queries', type=int, default=None, help='queries (or images) timed per path')
    parser.add_argument('--pairs_per_pass', type=int, default=None, help='default: 4096 on GPU, 1024 on CPU')
    parser.add_argument('--dtype', choices=['fp32', 'bf16', 'fp16'], default='fp32')
    args = parser.parse_args()

    device = torch.device(args.device)
    gpu = device.type == 'cuda'
    size = SIZES[args.size]
    queries = args.queries or (16 if gpu else 1)
    pairs_per_pass = args.pairs_per_pass or (4096 if gpu else 1024)
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.dtype]
    torch.manual_seed(0)
    model = Fusion(size).to(device, dtype).eval()
    width, k = size['width'], args.k_test
    image_feats = Pool(torch.randn(64, size['image_tokens'], width, device=device, dtype=dtype))
    text_feats = torch.randn(args.texts, args.text_len, width, device=device, dtype=dtype)
    # caption lengths as in MSCOCO: [CLS] + 8 to 25 word pieces (mean about 13), padded to text_len
    lengths = torch.randint(9, 27, (args.texts,), device=device).clamp(max=args.text_len)
    text_atts = (torch.arange(args.text_len, device=device) < lengths[:, None]).long()
    sims = torch.randn(args.images, args.texts, device=device)
    total_pairs = (args.images + args.texts) * k
    print(f'device {device} ({torch.cuda.get_device_name(device) if gpu else f"{torch.get_num_threads()} threads"}), '
          f'{args.dtype}, model {args.size}: BERT width {width}, '
          f'{size["layers"] - size["fusion"]} fusion layers, {size["image_tokens"]} image tokens; '
          f'{args.images} images x {args.texts} texts, k_test {k}: {total_pairs / 1e6:.2f}M pairs')

    # one query at a time: k pairs per pass, the image tokens copied for each pair
    rows = torch.arange(queries, device=device)
    _, _, image_idx, text_idx = candidate_pairs(sims, rows, k, 'i2t')
    run = dict(pairs_per_pass=k, share_images=False)
    time_pairs(model, image_feats, text_feats, text_atts, image_idx[:k], text_idx[:k], device, **run)  # warm-up
    per_query = time_pairs(model, image_feats, text_feats, text_atts, image_idx, text_idx, device, **run)

    # batched: i2t image queries with all their candidates; t2i every pair of a few images
    run = dict(pairs_per_pass=pairs_per_pass, share_images=True)
    i2t = time_pairs(model, image_feats, text_feats, text_atts, image_idx, text_idx, device, **run)
    _, _, image_idx_t2i, text_idx_t2i = candidate_pairs(sims.t(), torch.arange(args.texts, device=device), k, 't2i')
    keep = image_idx_t2i < max(1, queries // 4)
    t2i = time_pairs(model, image_feats, text_feats, text_atts, image_idx_t2i[keep], text_idx_t2i[keep], device,
                     **run)
    batched = total_pairs / (args.images * k / i2t + args.texts * k / t2i)

    print(f'one query at a time: {per_query:10.1f} pairs/s   whole evaluation ~{total_pairs / per_query / 60:8.1f} min')
    print(f'batched:             {batched:10.1f} pairs/s   whole evaluation ~{total_pairs / batched / 60:8.1f} min'
          f'   (i2t {i2t:.1f}, t2i {t2i:.1f} pairs/s; {pairs_per_pass} pairs per pass)')
    print(f'speed-up: {batched / per_query:.2f}x')


if __name__ == '__main__':
    main()
