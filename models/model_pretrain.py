"""Pre-training: ITC and ITM (momentum distillation, hard negatives) and MLM
(docs/DESIGN.md, "Pre-training objectives")."""
import math

import torch
import torch.nn.functional as F

from utils import to_device
from .base import ContrastiveALBEF
from .losses import mask_tokens, mlm_loss
from .xbert import BertForMaskedLM


class ALBEF(ContrastiveALBEF):
    def __init__(self, text_encoder=None, tokenizer=None, config=None, init_deit=True):
        super().__init__(config, tokenizer, text_encoder, BertForMaskedLM, init_deit=init_deit)
        self.mlm_probability = config['mlm_probability']
        # the masked-token index's length (see masked_positions): None (exact), a number, or 'bound'
        # (fixed by the batch's token count, masked_index_bound): for compiling the whole model
        # (--compile step); regional compilation (engine.build.compile_regions) leaves the MLM head eager
        self.mlm_positions = None

    def forward(self, image, text, alpha=0, mlm=None, update_momentum=True):
        """(loss_mlm, loss_ita, loss_itm). `mlm`: (input_ids, labels), the masked captions and their
        MLM labels as the loader's collate drew them (dataset.MaskedCaptionCollate); without it the
        masks are drawn here, after the ITM noise (the original's order of random draws). `text`
        and `mlm` are best passed on the CPU, as the loader gives them: the masked positions and
        the padding are read from the host's copy, and the tensors are moved to the device
        without the host waiting. `update_momentum`: see _momentum_update."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        itm_noise = self.draw_itm_noise(image.size(0), image.device)
        if mlm is None:
            input_ids = text.input_ids.cpu().clone()  # masked in place below; the caller's text is untouched
            labels = input_ids.clone()
            probability_matrix = torch.full(labels.shape, self.mlm_probability)
            input_ids, labels = self.mask(input_ids, self.text_encoder.config.vocab_size, image.device,
                                          targets=labels, probability_matrix=probability_matrix)
        else:
            input_ids, labels = mlm
            labels = labels.cpu()  # read on the host below (the loader's copy is there already)
        # The loss reads only the masked positions (about 15%), so the MLM head, whose vocabulary
        # projection costs about three BERT-base layers per token, runs on those alone: same loss.
        size = self.mlm_positions
        if size == 'bound':
            size = masked_index_bound(labels.numel(), self.mlm_probability)
        masked = to_device(masked_positions(labels, size), image.device)
        input_ids = to_device(input_ids, image.device)
        labels = to_device(labels.flatten(), image.device).index_select(0, masked.clamp(min=0))
        labels = labels.masked_fill(masked < 0, -100)  # padding of a fixed-size index (see masked_positions)
        host_mask = text.attention_mask.cpu()  # (the loader's copy: which tokens are padding, known on the host)
        text = to_device(text, image.device)
        # One text pass over the captions and their masked copies, one fusion pass over the ITM
        # pairs and the masked captions (each image's keys and values projected once for both),
        # and the same on the momentum side: 4 passes of the BERT layers where the original runs 7.
        # No image mask: every image token is attended, as with the original's all-ones mask.
        # The fusion passes return the masked tokens' outputs only (M, width), in the order of `masked`.
        loss_ita, loss_itm, mlm_states, mlm_states_m = self.contrastive_forward(
            image, text, alpha, mlm_input_ids=input_ids, itm_noise=itm_noise, host_mask=host_mask,
            mlm_positions=masked.clamp(min=0), update_momentum=update_momentum)
        with torch.no_grad():
            logits_m = self.text_encoder_m.cls(mlm_states_m)
        logits = self.text_encoder.cls(mlm_states)
        loss_mlm = mlm_loss(logits, labels, F.softmax(logits_m, dim=-1), alpha)
        return loss_mlm, loss_ita, loss_itm

    @torch.compiler.disable  # host work on the CPU generator (and the tokenizer): not traced when compiled
    def mask(self, input_ids, vocab_size, device, targets=None, masked_indices=None, probability_matrix=None):
        """BERT masking (models.losses.mask_tokens) with this model's tokenizer: of the chosen tokens
        80% become [MASK], 10% a random token, 10% stay; draws on the CPU generator."""
        return mask_tokens(input_ids, vocab_size, self.tokenizer.pad_token_id, self.tokenizer.cls_token_id,
                           self.tokenizer.mask_token_id, targets=targets, masked_indices=masked_indices,
                           probability_matrix=probability_matrix)


def masked_index_bound(tokens, probability):
    """A fixed length for the masked-token index of a batch of `tokens` tokens: the mean number of
    masked tokens plus 8 standard deviations plus 8, which a batch exceeds with a probability below
    about 1e-15 (then the index is exact for that step, one recompilation)."""
    mean = tokens * probability
    return min(tokens, math.ceil(mean + 8 * math.sqrt(mean * (1 - probability)) + 8))


@torch.compiler.disable  # a data-dependent length on the host: not traced when compiled
def masked_positions(labels, size=None):
    """Flat positions (on the CPU) of the tokens whose label is not -100, from the host's copy of
    the labels. With `size` (torch.compile: a shape that does not change from step to step) the
    index is padded with -1 to `size` entries; padded entries read position 0 and their labels are
    set to -100, so the loss ignores them."""
    positions = (labels != -100).flatten().nonzero().squeeze(1)
    if size is None or positions.numel() > size:  # (more than `size`: about 1e-15 per step, one recompile)
        return positions
    return torch.cat([positions, positions.new_full((size - positions.numel(),), -1)])
