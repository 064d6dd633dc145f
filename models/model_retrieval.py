"""Image-text retrieval (also Grounding): ITC with image-identity positives and ITM
(docs/DESIGN.md, "Retrieval model")."""
import torch
from torch import nn

from .base import ContrastiveALBEF


class ALBEF(ContrastiveALBEF):
    itm_eps = 1e-4  # added before the negative-sampling softmax, as in the original
    checkpoint_conversion = 'strip_bert'  # from a pre-training checkpoint (models/checkpoint.py)

    def __init__(self, text_encoder=None, tokenizer=None, config=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.distill = config['distill']
        embed_dim = config['embed_dim']

        self.visual_encoder = self.build_visual_encoder(config)
        self.text_encoder = self.build_text_encoder(config, text_encoder)
        vision_width = self.visual_encoder.embed_dim
        text_width = self.text_encoder.config.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.temp = nn.Parameter(torch.ones([]) * config['temp'])
        self.queue_size = config['queue_size']
        self.momentum = config['momentum']
        self.itm_head = nn.Linear(text_width, 2)

        # the momentum encoders exist even without distillation: they fill the queues
        self._create_momentum('visual_encoder', 'vision_proj', 'text_encoder', 'text_proj')
        self._create_queues(embed_dim, self.queue_size, with_idx=True)

    def forward(self, image, text, alpha, idx):
        loss_ita, loss_itm, _, _ = self.contrastive_forward(image, text, alpha, idx=idx, distill=self.distill)
        return loss_ita, loss_itm
