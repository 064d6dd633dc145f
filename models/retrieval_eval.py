"""Image-text retrieval evaluation (docs/DESIGN.md, "Retrieval evaluation"):
ITC similarities for every pair, then the ITM
positive logit for the top `k_test` candidates of each query, in both directions, and the recall
metrics of `itm_eval`.

The re-ranking batches the candidates of many queries into one fusion pass (at most
`pairs_per_pass` image-text pairs, which bounds memory), computes each image's cross-attention keys
and values once per pass, and splits the queries across ranks; it gives the same scores as scoring
one query at a time, which is the original's loop.
"""
import numpy as np
import torch
import torch.nn.functional as F

import utils


@torch.no_grad()
def text_features(model, texts, tokenizer, device, batch_size=256, max_length=30):
    """(text_feats (T, L, D) from the text layers, text_embeds (T, E) normalised, text_atts (T, L))."""
    feats, embeds, atts = [], [], []
    for start in range(0, len(texts), batch_size):
        text = tokenizer(texts[start:start + batch_size], padding='max_length', truncation=True,
                         max_length=max_length, return_tensors='pt').to(device)
        output = model.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text')
        feats.append(output.last_hidden_state)
        embeds.append(F.normalize(model.text_proj(output.last_hidden_state[:, 0, :]), dim=-1))
        atts.append(text.attention_mask)
    return torch.cat(feats), torch.cat(embeds), torch.cat(atts)


@torch.no_grad()
def image_features(model, images):
    """(image_feats (B, N, D), image_embeds (B, E) normalised) of a batch of images."""
    image_feats = model.visual_encoder(images)
    return image_feats, F.normalize(model.vision_proj(image_feats[:, 0, :]), dim=-1)


@torch.no_grad()
def itm_logits(model, image_feats, text_feats, text_atts, image_index=None):
    """ITM logits (B, 2) of (image, text) pairs, from the text-layer outputs and the image tokens.
    With `image_index` (B,), pair b uses image_feats[image_index[b]] (images projected once)."""
    # no image mask: every image token is attended (the original's all-ones mask, without the mask)
    output = model.text_encoder(encoder_embeds=text_feats, attention_mask=text_atts,
                                encoder_hidden_states=image_feats, mode='fusion', encoder_index=image_index)
    return model.itm_head(output.last_hidden_state[:, 0, :])


def itm_scores(model, image_feats, text_feats, text_atts, image_index=None):
    """The raw positive ITM logit of each pair, the re-ranking score of the original."""
    return itm_logits(model, image_feats, text_feats, text_atts, image_index)[:, 1]


def candidate_pairs(sims, rows, k, direction):
    """The (query, candidate) pairs to re-rank: each query row's top-k by `sims`, as flat tensors
    (queries, candidates, image index, text index) of length len(rows) * k."""
    queries = rows.repeat_interleave(k)
    candidates = sims[rows].topk(k, dim=1).indices.reshape(-1)
    image_idx, text_idx = (queries, candidates) if direction == 'i2t' else (candidates, queries)
    return queries, candidates, image_idx, text_idx


LENGTH_BUCKET = 4  # texts whose lengths differ by less than this share a re-ranking pass


@torch.no_grad()
def score_pairs(model, image_feats, text_feats, text_atts, image_idx, text_idx, pairs_per_pass=1024,
                share_images=True, progress=None):
    """ITM positive logit of each pair (image_idx[p], text_idx[p]), `pairs_per_pass` pairs per
    fusion pass.

    With `share_images` (the fast path) the pairs are ordered by text-length bucket, image and
    length; each image's cross-attention keys and values are computed once per pass instead of
    once per pair (and read by all its texts as one query sequence), and each pass drops the
    padding columns that all its texts share. Neither changes a
    score: padded keys get exactly zero attention, and no other token reads a padded token's output.
    """
    device = text_feats.device
    if share_images:
        # by length bucket (4 tokens), then image, then length: a pass holds texts of nearly one
        # length (little padding) and few images (each image's keys and values serve many texts)
        lengths = text_atts.sum(1)[text_idx]
        width = text_atts.size(1) + 1
        num_images = int(image_idx.max()) + 1 if len(image_idx) else 1
        buckets = lengths // LENGTH_BUCKET
        order = torch.argsort((buckets * num_images + image_idx) * width + lengths, stable=True)
        _, counts = torch.unique_consecutive(buckets[order], return_counts=True)
        groups = order.split(counts.tolist())  # a pass never mixes two buckets
    else:
        groups = [torch.arange(len(image_idx), device=device)]
    chunks = [chunk for group in groups for chunk in group.split(max(pairs_per_pass, 1))]
    scores = torch.empty(len(image_idx), device=device)
    for chunk in chunks:
        images, texts = image_idx[chunk], text_idx[chunk]
        pair_text_feats, pair_text_atts = text_feats[texts], text_atts[texts]
        if share_images:
            unique, index = images.unique(return_inverse=True)
            pair_image_feats = image_feats[unique]
            used = int(pair_text_atts.any(0).nonzero().max()) + 1  # right padding shared by all texts
            pair_text_feats, pair_text_atts = pair_text_feats[:, :used], pair_text_atts[:, :used]
        else:
            pair_image_feats, index = image_feats[images], None
        scores[chunk] = itm_scores(model, pair_image_feats, pair_text_feats, pair_text_atts, index).float()
        if progress is not None:
            progress.update(len(chunk))
    return scores


@torch.no_grad()
def rerank(model, sims, image_feats, text_feats, text_atts, k, direction, rows=None, pairs_per_pass=1024,
           share_images=True, progress=None):
    """Score matrix like `sims` (queries x candidates): the ITM logit for each query's top-k
    candidates by `sims`, -100 elsewhere. direction 'i2t': queries are images; 't2i': texts.

    Only the query `rows` given are scored (all by default); the other rows stay 0 so that the
    matrices of several ranks can be summed. `pairs_per_pass=k` with `share_images=False` is the
    original's loop, one query per fusion pass.
    """
    rows = torch.arange(sims.size(0), device=sims.device) if rows is None else rows
    k = min(k, sims.size(1))
    scores = torch.zeros(sims.shape, device=sims.device)
    scores[rows] = -100.0
    if len(rows):
        queries, candidates, image_idx, text_idx = candidate_pairs(sims, rows, k, direction)
        scores[queries, candidates] = score_pairs(model, image_feats, text_feats, text_atts, image_idx, text_idx,
                                                  pairs_per_pass, share_images, progress)
    return scores


def rank_rows(num_rows, rank, world_size):
    """The rows rank `rank` handles: contiguous blocks of num_rows // world_size + 1 (the original's split)."""
    step = num_rows // world_size + 1
    return torch.arange(min(num_rows, rank * step), min(num_rows, (rank + 1) * step))


@torch.no_grad()
def retrieval_scores(model, image_feats, image_embeds, text_feats, text_embeds, text_atts, k_test,
                     itc_only=False, pairs_per_pass=1024, show_progress=True):
    """(score_i2t (I, T), score_t2i (T, I)) as numpy arrays, identical on every rank.

    With `itc_only` the scores are the ITC similarities (no re-ranking); otherwise the re-ranking
    is split over ranks by query rows and the rows are gathered.
    """
    sims = image_embeds @ text_embeds.t()
    if itc_only:
        return sims.cpu().numpy(), sims.t().cpu().numpy()
    rank, world_size = utils.get_rank(), utils.get_world_size()
    results = []
    for direction, matrix in (('i2t', sims), ('t2i', sims.t())):
        rows = rank_rows(matrix.size(0), rank, world_size).to(matrix.device)
        bar = None
        if show_progress and utils.is_main_process():
            bar = utils.progress(total=len(rows) * min(k_test, matrix.size(1)), desc=f're-rank {direction}',
                                 unit='pair', leave=False)
        scores = rerank(model, matrix, image_feats, text_feats, text_atts, k_test, direction, rows,
                        pairs_per_pass, bar)
        if bar is not None:
            bar.close()
        # each rank scored its own block of rows: one all-gather of the blocks (not a sum of full matrices)
        results.append(utils.gather_rows(scores[rows], matrix.size(0)).cpu().numpy())
    return tuple(results)


def itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """Recall@1/5/10 (percent) in both directions. An image's rank is the best rank of any of its
    texts; ties are ordered as numpy's default argsort, reversed, orders them (as the original)."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr1, tr5, tr10 = (100.0 * float(np.mean(ranks < k)) for k in (1, 5, 10))

    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1, ir5, ir10 = (100.0 * float(np.mean(ranks < k)) for k in (1, 5, 10))

    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    return {'txt_r1': tr1, 'txt_r5': tr5, 'txt_r10': tr10, 'txt_r_mean': tr_mean,
            'img_r1': ir1, 'img_r5': ir5, 'img_r10': ir10, 'img_r_mean': ir_mean,
            'r_mean': (tr_mean + ir_mean) / 2}


def chance_metrics(num_images, num_texts, texts_per_image):
    """Expected recall of a random ranking (printed next to the metrics)."""
    def recall(k, n, positives):
        # P(at least one of `positives` items in the top k of n shuffled)
        if k >= n:
            return 100.0
        miss = 1.0
        for j in range(int(round(positives))):
            miss *= (n - k - j) / (n - j)
        return 100.0 * (1 - miss)
    tr = [recall(k, num_texts, texts_per_image) for k in (1, 5, 10)]
    ir = [recall(k, num_images, 1) for k in (1, 5, 10)]
    return {'txt_r_mean': sum(tr) / 3, 'img_r_mean': sum(ir) / 3, 'r_mean': (sum(tr) + sum(ir)) / 6}
