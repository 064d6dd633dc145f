"""NLVR2: is the sentence true of the image pair? (docs/DESIGN.md, "NLVR2 model and image pairs").
Label 1 means "True".

The 18-layer BERT splits each fusion layer into two: layers 6, 8, ..., 16 attend to image 0 and
layers 7, 9, ..., 17 to image 1, and each pair of sub-layers shares its cross-attention key and
value projections.
"""
import torch

from .base import ClassifierALBEF, read_bert_config


def share_cross_attention(encoder):
    """Make layer l and l+1 (l = fusion_layer + 2i) use the very same key/value Parameters."""
    fusion_layer = encoder.config.fusion_layer
    for layer_num in range(fusion_layer, encoder.config.num_hidden_layers, 2):
        this = encoder.layer[layer_num].crossattention.self
        other = encoder.layer[layer_num + 1].crossattention.self
        for name in ('key', 'value'):
            getattr(this, name).weight = getattr(other, name).weight
            getattr(this, name).bias = getattr(other, name).bias


def pair_layers(config):
    """Layers of the image-pair BERT: the text layers, then every fusion layer twice (18 for BERT-base)."""
    bert_config = read_bert_config(config)
    return bert_config.fusion_layer + 2 * (bert_config.num_hidden_layers - bert_config.fusion_layer)


class ALBEF(ClassifierALBEF):
    new_heads = ('cls_head',)  # loaded from a text-assignment checkpoint, which has none

    def __init__(self, text_encoder=None, tokenizer=None, config=None):
        super().__init__(config, tokenizer, text_encoder, num_hidden_layers=pair_layers(config))
        share_cross_attention(self.text_encoder.encoder)
        self._build_classifier(config, 2)
        if self.distill:
            share_cross_attention(self.text_encoder_m.encoder)

    def _image_inputs(self, image_embeds, batch_size):
        """`image` is [image0 ; image1] on dim 0: split it into the pair."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        return list(torch.split(image_embeds, batch_size)), list(torch.split(image_atts, batch_size))
