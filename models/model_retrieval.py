"""Image-text retrieval (also Grounding): ITC with image-identity positives and ITM
(docs/DESIGN.md, "Retrieval model")."""
from .base import ContrastiveALBEF


class ALBEF(ContrastiveALBEF):
    itm_eps = 1e-4  # added before the negative-sampling softmax, as in the original
    checkpoint_conversion = 'strip_bert'  # from a pre-training checkpoint (models/checkpoint.py)

    def __init__(self, text_encoder=None, tokenizer=None, config=None, momentum=True):
        super().__init__(config, tokenizer, text_encoder, with_idx=True, momentum=momentum)
        self.distill = config['distill']  # the ITC targets; the momentum encoders exist either way

    def forward(self, image, text, alpha, idx, update_momentum=True):
        loss_ita, loss_itm, _, _ = self.contrastive_forward(image, text, alpha, idx=idx, distill=self.distill,
                                                            update_momentum=update_momentum)
        return loss_ita, loss_itm
