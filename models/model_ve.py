"""SNLI-VE: three-way classification of an image and a sentence (docs/DESIGN.md, "Visual entailment model").
Labels: entailment 2, neutral 1, contradiction 0."""
from .base import ClassifierALBEF


class ALBEF(ClassifierALBEF):
    checkpoint_conversion = 'strip_bert'  # from a pre-training checkpoint (models/checkpoint.py)
    new_heads = ('cls_head',)

    def __init__(self, text_encoder=None, tokenizer=None, config=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.distill = config['distill']
        self.visual_encoder = self.build_visual_encoder(config)
        self.text_encoder = self.build_text_encoder(config, text_encoder)
        self.cls_head = self.make_cls_head(self.text_encoder.config.hidden_size, 3)
        if self.distill:
            self.momentum = 0.995
            self._create_momentum('visual_encoder', 'text_encoder', 'cls_head')
