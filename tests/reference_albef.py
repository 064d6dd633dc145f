"""An independent, functional reference of what the ORIGINAL ALBEF computes: the training
mechanics (momentum, queues, hard negatives, MLM masking) and the forward of every model, on the
encoders of tests/reference_encoders.py, whose docstring gives the conventions (a state_dict plus
inputs, explicit tensor operations, the original's order of random draws, no dropout). Nothing
here imports `models`.

Training forwards also return `new_state`, the full state_dict after the forward (momentum EMA
applied, queues and queue_ptr written, `temp` clamped): pre-training and retrieval return
`(losses, new_state, info)` with the samples drawn in `info`; VQA and VE/NLVR `(loss, new_state)`;
the text-assignment forward `(loss, labels)` (it changes no state).
"""
import torch

import reference_encoders
from reference_encoders import (CLS_ID, MASK_ID, PAD_ID, bert_forward, hard_cross_entropy, linear, lm_sequence_loss,
                                mlm_logits, mlm_loss, normalize, soft_cross_entropy, vit_forward)

# test_parity calls every reference as ref.NAME, the encoders' too
HParams = reference_encoders.HParams


# ------------------------------------------------------------------------------------------
# shared machinery (docs/DESIGN.md, "Momentum encoders and feature queues")
# ------------------------------------------------------------------------------------------
def momentum_update(sd, names, m):
    """theta_m <- theta_m * m + theta * (1 - m) for every floating tensor of the named modules."""
    new = dict(sd)
    for name in names:
        for key, value in sd.items():
            if key.startswith(name + '.') and value.is_floating_point():
                key_m = name + '_m.' + key[len(name) + 1:]
                new[key_m] = sd[key_m] * m + value * (1.0 - m)
    return new


def enqueue(sd, image_feat_m, text_feat_m, queue_size, idx=None):
    """Write the momentum features into the queue columns [ptr, ptr + B); ptr <- (ptr + B) mod Q."""
    new = dict(sd)
    b = image_feat_m.shape[0]
    assert queue_size % b == 0
    ptr = int(sd['queue_ptr'][0])
    for key, feat in (('image_queue', image_feat_m), ('text_queue', text_feat_m)):
        q = sd[key].clone()
        q[:, ptr:ptr + b] = feat.t()
        new[key] = q
    if idx is not None:
        q = sd['idx_queue'].clone()
        q[:, ptr:ptr + b] = idx.view(1, -1)
        new['idx_queue'] = q
    new['queue_ptr'] = torch.tensor([(ptr + b) % queue_size], dtype=sd['queue_ptr'].dtype)
    return new


def draw_rows(weights, num_samples=1):
    """torch.multinomial row by row, in row order (the original's RNG consumption)."""
    return [torch.multinomial(weights[b], num_samples) for b in range(weights.shape[0])]


# ------------------------------------------------------------------------------------------
# ITC + ITM, shared by pre-training and retrieval
# (docs/DESIGN.md, "Pre-training objectives", "Retrieval model")
# ------------------------------------------------------------------------------------------
def unimodal_features(sd, suffix, bert_prefix, hp, image, ids, mask):
    """(image_embeds, image_feat, text_embeds, text_feat) of the online (suffix '') or momentum
    (suffix '_m') encoders; features are L2-normalised projections of the [CLS] outputs."""
    image_embeds = vit_forward(sd, f'visual_encoder{suffix}.', image, hp)
    image_feat = normalize(linear(sd, f'vision_proj{suffix}', image_embeds[:, 0]))
    text_embeds = bert_forward(sd, bert_prefix.format(s=suffix), hp, ids, mask, mode='text')
    text_feat = normalize(linear(sd, f'text_proj{suffix}', text_embeds[:, 0]))
    return image_embeds, image_feat, text_embeds, text_feat


def itm_logits(sd, bert_prefix, hp, text_embeds, text_mask, image_embeds, image_atts=None):
    """itm_head on the fusion-mode [CLS] (text-encoder outputs fed through the fusion layers)."""
    if image_atts is None:
        image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    out = bert_forward(sd, bert_prefix, hp, attention_mask=text_mask, encoder_embeds=text_embeds,
                       encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, mode='fusion')
    return linear(sd, 'itm_head', out[:, 0])


def contrastive_forward(sd, hp, bert_prefix, image, ids, mask, alpha, momentum, queue_size,
                        idx=None, distill=True, itm_eps=0.0):
    """ITC with momentum distillation, the EMA update, the queue update and ITM with hard
    negatives. Returns (loss_ita, loss_itm, new_state, info); `info` holds the image embeddings
    of both encoders and the sampled negatives."""
    B = image.shape[0]
    temp = sd['temp']
    image_embeds, image_feat, text_embeds, text_feat = unimodal_features(
        sd, '', bert_prefix.format(s=''), hp, image, ids, mask)

    # targets: the diagonal (pre-training) or every pair of the same image (retrieval)
    if idx is not None:
        idx_all = torch.cat([idx.view(1, -1), sd['idx_queue']], dim=1)
        pos = (idx.view(-1, 1) == idx_all).float()
        sim_targets = pos / pos.sum(1, keepdim=True)
    else:
        sim_targets = torch.zeros(B, B + queue_size)
        sim_targets[torch.arange(B), torch.arange(B)] = 1.0

    # momentum features, after the EMA update
    sd = momentum_update(sd, ['visual_encoder', 'vision_proj', 'text_encoder', 'text_proj'], momentum)
    image_embeds_m = vit_forward(sd, 'visual_encoder_m.', image, hp)
    image_feat_m = normalize(linear(sd, 'vision_proj_m', image_embeds_m[:, 0]))
    image_feat_all = torch.cat([image_feat_m.t(), sd['image_queue']], dim=1)
    text_embeds_m = bert_forward(sd, bert_prefix.format(s='_m'), hp, ids, mask, mode='text')
    text_feat_m = normalize(linear(sd, 'text_proj_m', text_embeds_m[:, 0]))
    text_feat_all = torch.cat([text_feat_m.t(), sd['text_queue']], dim=1)
    if distill:
        sim_i2t_targets = alpha * torch.softmax(image_feat_m @ text_feat_all / temp, 1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * torch.softmax(text_feat_m @ image_feat_all / temp, 1) + (1 - alpha) * sim_targets
    else:
        sim_i2t_targets = sim_t2i_targets = sim_targets

    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    loss_ita = (soft_cross_entropy(sim_i2t, sim_i2t_targets) + soft_cross_entropy(sim_t2i, sim_t2i_targets)) / 2

    sd = enqueue(sd, image_feat_m, text_feat_m, queue_size, idx)

    # ITM with hard negatives
    image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    weights_i2t = torch.softmax(sim_i2t[:, :B] + itm_eps, 1)
    weights_t2i = torch.softmax(sim_t2i[:, :B] + itm_eps, 1)
    same = torch.eye(B, dtype=torch.bool) if idx is None else (idx.view(-1, 1) == idx.view(1, -1))
    weights_i2t = weights_i2t.masked_fill(same, 0)
    weights_t2i = weights_t2i.masked_fill(same, 0)
    neg_image = [int(j) for j in draw_rows(weights_t2i)]   # first: a negative image for every text
    neg_text = [int(j) for j in draw_rows(weights_i2t)]    # then: a negative text for every image
    image_embeds_neg = torch.stack([image_embeds[j] for j in neg_image])
    text_embeds_neg = torch.stack([text_embeds[j] for j in neg_text])
    text_mask_neg = torch.stack([mask[j] for j in neg_text])

    bp = bert_prefix.format(s='')
    pos_logits = itm_logits(sd, bp, hp, text_embeds, mask, image_embeds, image_atts)
    neg_logits = itm_logits(sd, bp, hp, torch.cat([text_embeds, text_embeds_neg]), torch.cat([mask, text_mask_neg]),
                            torch.cat([image_embeds_neg, image_embeds]), torch.cat([image_atts, image_atts]))
    vl = torch.cat([pos_logits, neg_logits])
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
    loss_itm = hard_cross_entropy(vl, labels)
    info = dict(image_embeds=image_embeds, image_embeds_m=image_embeds_m, neg_image=neg_image,
                neg_text=neg_text, image_feat=image_feat, text_feat=text_feat,
                image_feat_m=image_feat_m, text_feat_m=text_feat_m, itm_logits=vl)
    return loss_ita, loss_itm, sd, info


def mask_tokens(input_ids, mlm_probability, vocab_size):
    """MLM masking (docs/DESIGN.md, "MLM with momentum distillation"); all draws on the CPU
    generator, in this order: bernoulli(p) picks
    positions ([PAD]/[CLS] excluded), bernoulli(0.8) -> [MASK], bernoulli(0.5) of the rest -> a
    random id from randint(vocab) drawn over the whole shape. Returns (masked ids, labels)."""
    ids = input_ids.clone()
    labels = input_ids.clone()
    masked = torch.bernoulli(torch.full(ids.shape, mlm_probability)).bool()
    masked[ids == PAD_ID] = False
    masked[ids == CLS_ID] = False
    labels[~masked] = -100
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8)).bool() & masked
    ids[replaced] = MASK_ID
    random = torch.bernoulli(torch.full(ids.shape, 0.5)).bool() & masked & ~replaced
    random_words = torch.randint(vocab_size, ids.shape, dtype=torch.long)
    ids[random] = random_words[random]
    return ids, labels


def pretrain_forward(sd, hp, image, ids, mask, alpha, momentum=0.995, queue_size=65536, mlm_probability=0.15):
    """models/model_pretrain.py forward (docs/DESIGN.md, "Pre-training objectives").
    Returns ((loss_mlm, loss_ita, loss_itm), new_state, info)."""
    sd = dict(sd)
    sd['temp'] = sd['temp'].clamp(0.001, 0.5)
    loss_ita, loss_itm, sd, info = contrastive_forward(
        sd, hp, 'text_encoder{s}.bert.', image, ids, mask, alpha, momentum, queue_size)
    masked_ids, labels = mask_tokens(ids, mlm_probability, hp.vocab_size)
    image_atts = torch.ones(info['image_embeds'].shape[:2], dtype=torch.long)
    logits_m = mlm_logits(sd, 'text_encoder_m.', hp, masked_ids, mask, encoder_hidden_states=info['image_embeds_m'],
                          encoder_attention_mask=image_atts)
    logits = mlm_logits(sd, 'text_encoder.', hp, masked_ids, mask, encoder_hidden_states=info['image_embeds'],
                        encoder_attention_mask=image_atts)
    loss_mlm = mlm_loss(logits, labels, torch.softmax(logits_m, -1), alpha)
    info.update(masked_ids=masked_ids, mlm_labels=labels)
    return (loss_mlm, loss_ita, loss_itm), sd, info


def retrieval_forward(sd, hp, image, ids, mask, alpha, idx, momentum=0.995, queue_size=65536, distill=True):
    """models/model_retrieval.py forward (docs/DESIGN.md, "Retrieval model"):
    no temp clamp, image-identity positives,
    +1e-4 before the sampling softmax. Returns ((loss_ita, loss_itm), new_state, info)."""
    loss_ita, loss_itm, sd, info = contrastive_forward(
        dict(sd), hp, 'text_encoder{s}.', image, ids, mask, alpha, momentum, queue_size,
        idx=idx, distill=distill, itm_eps=1e-4)
    return (loss_ita, loss_itm), sd, info


# ------------------------------------------------------------------------------------------
# VQA (docs/DESIGN.md, "VQA model and answer ranking")
# ------------------------------------------------------------------------------------------
def vqa_question_states(sd, hp, suffix, image, q_ids, q_mask):
    image_embeds = vit_forward(sd, f'visual_encoder{suffix}.', image, hp)
    atts = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    return bert_forward(sd, f'text_encoder{suffix}.', hp, q_ids, q_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=atts, mode='multi_modal')


def decoder_logits(sd, prefix, hp, ids, mask, states, states_mask):
    """The causal answer decoder (all layers cross-attend: fusion_layer 0). Unshifted logits."""
    return mlm_logits(sd, prefix, hp, ids, mask, encoder_hidden_states=states,
                      encoder_attention_mask=states_mask, is_decoder=True, fusion_layer=0)


def vqa_train_forward(sd, hp, image, q_ids, q_mask, a_ids, a_mask, k, weights, alpha, distill=True, momentum=0.995):
    """Weighted, distilled answer NLL: sum(weights * per-answer loss) / num_questions."""
    repeats = torch.tensor(k)
    q_states = vqa_question_states(sd, hp, '', image, q_ids, q_mask)
    q_states = torch.repeat_interleave(q_states, repeats, 0)
    q_atts = torch.repeat_interleave(q_mask, repeats, 0)
    targets = a_ids.masked_fill(a_ids == PAD_ID, -100)
    soft = None
    if distill:
        sd = momentum_update(sd, ['visual_encoder', 'text_encoder', 'text_decoder'], momentum)
        q_states_m = torch.repeat_interleave(vqa_question_states(sd, hp, '_m', image, q_ids, q_mask), repeats, 0)
        logits_m = decoder_logits(sd, 'text_decoder_m.', hp, a_ids, a_mask, q_states_m, q_atts)[:, :-1]
        soft = torch.softmax(logits_m, -1)
    logits = decoder_logits(sd, 'text_decoder.', hp, a_ids, a_mask, q_states, q_atts)
    per_answer = lm_sequence_loss(logits, targets, soft, alpha)
    return (weights * per_answer).sum() / image.shape[0], sd


def vqa_rank_answer(sd, hp, image, q_ids, q_mask, a_ids, a_mask, k):
    """rank_answer: shortlist k candidates by the first-token probability, rescore each by the
    log of that probability plus minus its whole-answer NLL (which counts the first token again),
    softmax over the k, re-sort. Returns (topk_ids, topk_probs)."""
    q_states = vqa_question_states(sd, hp, '', image, q_ids, q_mask)
    num_q = q_states.shape[0]
    start = a_ids[0, 0].repeat(num_q, 1)
    first_logits = decoder_logits(sd, 'text_decoder.', hp, start, torch.ones(num_q, 1), q_states, q_mask)[:, 0]
    prob_first = torch.softmax(first_logits, 1)[:, a_ids[:, 1]]        # (num_q, A)
    topk_probs, topk_ids = prob_first.topk(k, dim=1)
    cand_ids = torch.cat([a_ids[topk_ids[q]] for q in range(num_q)])   # question by question
    cand_mask = torch.cat([a_mask[topk_ids[q]] for q in range(num_q)])
    targets = cand_ids.masked_fill(cand_ids == PAD_ID, -100)
    states = torch.cat([q_states[q:q + 1].expand(k, -1, -1) for q in range(num_q)])   # q0 x k, q1 x k, ...
    states_mask = torch.cat([q_mask[q:q + 1].expand(k, -1) for q in range(num_q)])
    nll = lm_sequence_loss(decoder_logits(sd, 'text_decoder.', hp, cand_ids, cand_mask, states, states_mask), targets)
    log_probs = (topk_probs.log().view(-1) - nll).view(num_q, k)
    probs = torch.softmax(log_probs, 1)
    probs, rerank = probs.topk(k, dim=1)
    return topk_ids.gather(1, rerank), probs


# ------------------------------------------------------------------------------------------
# VE and NLVR2 (docs/DESIGN.md, "Visual entailment model", "NLVR2 model and image pairs")
# ------------------------------------------------------------------------------------------
def classifier_logits(sd, hp, suffix, image, ids, mask, pair=False):
    """cls_head(Linear, ReLU, Linear) on the multi_modal [CLS]. With `pair`, `image` is
    [image0 ; image1] and the fusion layers alternate between the two halves."""
    image_embeds = vit_forward(sd, f'visual_encoder{suffix}.', image, hp)
    atts = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    if pair:
        B = ids.shape[0]
        states, masks = [image_embeds[:B], image_embeds[B:]], [atts[:B], atts[B:]]
    else:
        states, masks = image_embeds, atts
    out = bert_forward(sd, f'text_encoder{suffix}.', hp, ids, mask, encoder_hidden_states=states,
                       encoder_attention_mask=masks, mode='multi_modal')
    h = torch.relu(linear(sd, f'cls_head{suffix}.0', out[:, 0]))
    return linear(sd, f'cls_head{suffix}.2', h)


def classifier_train_forward(sd, hp, image, ids, mask, targets, alpha, pair=False, distill=True, momentum=0.995):
    """(1 - alpha) CE(pred, targets) - alpha mean_b sum_c log_softmax(pred) softmax(pred_m)."""
    pred = classifier_logits(sd, hp, '', image, ids, mask, pair)
    loss = hard_cross_entropy(pred, targets)
    if not distill:
        return loss, dict(sd)
    sd = momentum_update(sd, ['visual_encoder', 'text_encoder', 'cls_head'], momentum)
    pred_m = classifier_logits(sd, hp, '_m', image, ids, mask, pair)
    distill_term = -(torch.log_softmax(pred, 1) * torch.softmax(pred_m, 1)).sum(1).mean()
    return (1 - alpha) * loss + alpha * distill_term, sd


# ------------------------------------------------------------------------------------------
# text-assignment pre-training (docs/DESIGN.md, "Text-assignment pre-training model")
# ------------------------------------------------------------------------------------------
def ta_forward(sd, hp, image, ids, mask):
    """Per text b: u = rand(1); u > 1/3 -> one image j ~ w[b] and a second rand decides the order
    (label 0: (b, j), label 1: (j, b)); else two images without replacement (label 2)."""
    image_embeds = vit_forward(sd, 'visual_encoder.', image, hp)
    atts = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    f = normalize(linear(sd, 'vision_proj', image_embeds[:, 0]))
    w = torch.softmax(f @ f.t() / 0.07, 1)
    w = w.masked_fill(torch.eye(w.shape[0], dtype=torch.bool), 0)
    img0, img1, labels = [], [], []
    for b in range(image.shape[0]):
        if torch.rand(1) > 1 / 3:
            j = int(torch.multinomial(w[b], 1))
            if torch.rand(1) > 0.5:
                pair, label = (b, j), 0
            else:
                pair, label = (j, b), 1
        else:
            j1, j2 = torch.multinomial(w[b], 2).tolist()
            pair, label = (j1, j2), 2
        img0.append(image_embeds[pair[0]])
        img1.append(image_embeds[pair[1]])
        labels.append(label)
    out = bert_forward(sd, 'text_encoder.', hp, ids, mask, encoder_hidden_states=[torch.stack(img0), torch.stack(img1)],
                       encoder_attention_mask=[atts, atts], mode='multi_modal')
    labels = torch.tensor(labels)
    return hard_cross_entropy(linear(sd, 'ta_head', out[:, 0]), labels), labels
