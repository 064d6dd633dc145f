"""SNLI-VE: three-way classification of an image and a sentence (docs/DESIGN.md, "Visual entailment model").
Labels: entailment 2, neutral 1, contradiction 0."""
from .base import ClassifierALBEF


class ALBEF(ClassifierALBEF):
    checkpoint_conversion = 'strip_bert'  # from a pre-training checkpoint (models/checkpoint.py)
    new_heads = ('cls_head',)

    def __init__(self, text_encoder=None, tokenizer=None, config=None):
        super().__init__(config, tokenizer, text_encoder)
        self._build_classifier(config, 3)
