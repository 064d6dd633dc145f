"""ALBEF's objectives as functions of tensors (docs/DESIGN.md, "Pre-training objectives",
"Masked-LM head", "Answer decoder", "Downstream models").

Each distillation loss mixes the hard-label loss with the cross-entropy against the momentum
model's soft predictions, weighted by `alpha`; at alpha = 0 each reduces to its plain form.
"""
import torch
import torch.nn.functional as F


def soft_cross_entropy(logits, targets):
    """mean_rows( -sum_cols log_softmax(logits) * targets )."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss(sim_i2t, sim_t2i, sim_i2t_targets, sim_t2i_targets):
    """Image-text contrastive loss with soft targets: the mean of both directions."""
    loss_i2t = soft_cross_entropy(sim_i2t, sim_i2t_targets)
    loss_t2i = soft_cross_entropy(sim_t2i, sim_t2i_targets)
    return (loss_i2t + loss_t2i) / 2


def distill_targets(sim_m, hard_targets, alpha):
    """alpha * softmax(momentum similarities) + (1 - alpha) * hard targets."""
    return alpha * F.softmax(sim_m, dim=1) + (1 - alpha) * hard_targets


def classification_distill_loss(pred, targets, pred_m=None, alpha=0):
    """VE / NLVR2: (1 - alpha) * CE(pred, targets) + alpha * soft CE against softmax(pred_m)."""
    loss = F.cross_entropy(pred, targets)
    if pred_m is None:
        return loss
    return (1 - alpha) * loss + alpha * soft_cross_entropy(pred, F.softmax(pred_m, dim=1))


def mlm_loss(logits, labels, soft_labels=None, alpha=0):
    """Masked-LM loss: mean CE over positions whose label is not -100, mixed with the mean
    distillation CE over the same positions when `soft_labels` (B, L, V) is given.

    A batch with no masked position gives 0 where the original gives NaN (0/0).
    """
    valid = labels != -100
    count = valid.sum().clamp(min=1)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), reduction='sum') / count
    if soft_labels is None:
        return loss
    distill = -(F.log_softmax(logits, dim=-1) * soft_labels).sum(dim=-1)
    distill = (distill * valid).sum() / count
    return (1 - alpha) * loss + alpha * distill


def lm_loss(logits, labels, soft_labels=None, alpha=0, reduction='mean'):
    """Causal LM loss of the VQA decoder: logits[:, :-1] predict labels[:, 1:].

    With reduction='none' the result is per sequence (B,): the summed NLL of its tokens, plus
    (with `soft_labels` of shape (B, L-1, V)) the summed distillation CE over the same tokens.
    """
    shifted = logits[:, :-1, :].contiguous()
    labels = labels[:, 1:].contiguous()
    loss = F.cross_entropy(shifted.view(-1, shifted.size(-1)), labels.view(-1), reduction=reduction)
    if reduction == 'none':
        loss = loss.view(logits.size(0), -1).sum(1)
    if soft_labels is not None:
        distill = -(F.log_softmax(shifted, dim=-1) * soft_labels).sum(dim=-1)
        distill = (distill * (labels != -100)).sum(1)
        loss = (1 - alpha) * loss + alpha * distill
    return loss


def hard_negative_weights(sim, exclude, eps=0.0):
    """Sampling weights for ITM negatives: softmax over the in-batch similarities, zero where
    `exclude` (the diagonal, or every pair showing the same image). Rows are not renormalised."""
    return F.softmax(sim + eps, dim=1).masked_fill(exclude, 0)


def sample_negatives(weights, noise=None):
    """One index per row of `weights` (non-negative, not necessarily normalised), drawn with
    probability proportional to the weight, without reading anything back to the host.

    This is what torch.multinomial(weights, 1) computes (argmax of weights / Exp(1) noise), minus
    its validity checks, which on CUDA read two values back to the host every call. On the CPU
    it draws exactly what multinomial, and the original's row-by-row loop, draw for the same
    seed (a test); on CUDA the stream differs, the distribution does not. A row of zeros (no
    possible negative) gives index 0 where multinomial raises an error. `noise`: the Exp(1) draws,
    if made beforehand (same shape as `weights`).
    """
    if noise is None:
        noise = torch.empty_like(weights).exponential_(1)
    return torch.argmax(weights / noise, dim=-1)


def mask_tokens(input_ids, vocab_size, pad_token_id, cls_token_id, mask_token_id, targets=None,
                masked_indices=None, probability_matrix=None):
    """BERT masking of `input_ids` in place: of the chosen tokens 80% become [MASK], 10% a random
    token, 10% stay; `targets` (in place too) keep their value only where a token was chosen.

    Every random draw is made on the CPU generator, in the original's order (bernoulli of
    `probability_matrix`, 0.8, 0.5, then randint over the whole shape), and [PAD] and [CLS] are
    never chosen. The ids may be on any device; the draws are the same."""
    ids_cpu = input_ids.cpu()
    if masked_indices is None:
        masked_indices = torch.bernoulli(probability_matrix).bool()
    # (masked_fill and where rather than boolean-mask indexing: the same values, and no
    # data-dependent shapes, so nothing here reads the device even with the ids on it)
    special = (ids_cpu == pad_token_id) | (ids_cpu == cls_token_id)
    masked_indices = masked_indices.cpu() & ~special
    if targets is not None:
        targets.masked_fill_(~masked_indices.to(targets.device), -100)  # loss only on masked tokens
    replaced = torch.bernoulli(torch.full(input_ids.shape, 0.8)).bool() & masked_indices
    random_words = torch.bernoulli(torch.full(input_ids.shape, 0.5)).bool() & masked_indices & ~replaced
    random_ids = torch.randint(vocab_size, input_ids.shape, dtype=torch.long)
    input_ids.masked_fill_(replaced.to(input_ids.device), mask_token_id)
    input_ids.copy_(torch.where(random_words, random_ids, input_ids.cpu()).to(input_ids.device))
    return (input_ids, targets) if targets is not None else input_ids
