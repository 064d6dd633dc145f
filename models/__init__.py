"""ALBEF models: the ViT image encoder, BERT with fusion layers, and the six task variants."""
