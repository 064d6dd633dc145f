"""Text-assignment (TA) pre-training for NLVR2 (docs/DESIGN.md, "Text-assignment pre-training model"):
given a text and an image pair, say
whether the text matches image 0 (label 0), image 1 (label 1) or neither (label 2)."""
import torch
import torch.nn.functional as F
from torch import nn

from utils import to_device
from .base import ALBEFBase
from .losses import sample_negatives
from .model_nlvr import pair_layers, share_cross_attention


class ALBEF(ALBEFBase):
    checkpoint_conversion = 'ta'  # from a pre-training checkpoint (models/checkpoint.py)
    new_heads = ('ta_head',)

    def __init__(self, text_encoder=None, tokenizer=None, config=None):
        super().__init__(config, tokenizer, text_encoder, num_hidden_layers=pair_layers(config))
        share_cross_attention(self.text_encoder.encoder)
        # vision_proj drives the negative sampling; text_proj and temp are loaded but unused
        self._build_projections(config['embed_dim'], 0.07)
        self.ta_head = nn.Linear(self.text_encoder.config.hidden_size, 3)

    def forward(self, image, text):
        image_embeds = self.visual_encoder(image)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        with torch.no_grad():
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
            sim = image_feat @ image_feat.t() / 0.07
            weights = F.softmax(sim, dim=1).fill_diagonal_(0)

        # The original's per-sample draws, in its order (the coin flips come from the CPU generator,
        # the partners from the images' device), without reading a partner back to the host;
        # the partners are multinomial's draws without its host-side checks (sample_negatives).
        image_inputs, labels = [], []
        for b in range(image.size(0)):
            this = torch.full((1,), b, dtype=torch.long, device=image.device)
            if torch.rand(1) > 1 / 3:  # (CPU coin flips: read on the host, no device involved)
                other = sample_negatives(weights[b]).view(1)
                if torch.rand(1) > 0.5:
                    image_inputs.append(torch.cat([this, other]))
                    labels.append(0)
                else:
                    image_inputs.append(torch.cat([other, this]))
                    labels.append(1)
            else:
                image_inputs.append(sample_without_replacement(weights[b], 2))
                labels.append(2)
        pairs = torch.stack(image_inputs)
        labels = to_device(torch.tensor(labels), image.device)

        output = self.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                   encoder_hidden_states=[image_embeds[pairs[:, 0]], image_embeds[pairs[:, 1]]],
                                   encoder_attention_mask=[image_atts, image_atts], return_dict=True)
        return F.cross_entropy(self.ta_head(output.last_hidden_state[:, 0, :]), labels)


def sample_without_replacement(weights, n):
    """n distinct indices drawn with probability proportional to `weights` (1-D): what
    torch.multinomial(weights, n) computes (the top n of weights / Exp(1) noise, the same draws on
    the CPU), without its validity checks, which read values back to the host on CUDA."""
    noise = torch.empty_like(weights).exponential_(1)
    return torch.topk(weights / noise, n).indices
