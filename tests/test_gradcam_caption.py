"""`LoadedModel.gradcam`: each word piece's map, and the whole caption's (models/gradcam.caption_map,
`.caption_map`: the mean of the per-token maps over the caption's word pieces, [CLS], [SEP] and
padding left out), checked against a computation of their own from the captured cross-attention and
its gradient."""
import cv2
import numpy as np
import torch
from PIL import Image
from transformers import BatchEncoding

from conftest import TINY_CONFIG
from models import gradcam
from models.api import LoadedModel


def test_caption_map_averages_the_word_pieces_only():
    # 2 texts x 5 positions, map of position t = t + 1 everywhere on a 1 x 2 grid
    token_maps = torch.arange(1., 6.).view(1, 5, 1, 1).expand(2, 5, 1, 2).clone()
    text = BatchEncoding({'input_ids': torch.tensor([[101, 7, 8, 102, 0], [101, 9, 0, 0, 0]]),
                          'attention_mask': torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])})
    # text 0: word pieces at positions 1, 2 ([CLS] at 0, [SEP] at 3, padding at 4): (2 + 3) / 2
    # text 1: one word piece at position 1: 2
    got = gradcam.caption_map(token_maps, text, skip_ids=[102])
    assert got.shape == (2, 1, 2)
    assert got.tolist() == [[[2.5, 2.5]], [[2.0, 2.0]]]
    # without [SEP] left out it is averaged in: (2 + 3 + 4) / 3
    assert gradcam.caption_map(token_maps, text)[0].tolist() == [[3.0, 3.0]]
    # no word piece at all: zero, not a division by zero
    empty = BatchEncoding({'input_ids': torch.tensor([[101]]), 'attention_mask': torch.tensor([[1]])})
    assert gradcam.caption_map(token_maps[:1, :1], empty).tolist() == [[[0.0, 0.0]]]


def direct_token_maps(model, image, tokens, block_num):
    """Each text position's Grad-CAM computed from scratch, (L, 4, 4): capture layer `block_num`'s
    cross-attention and its gradient by a plain backward of the ITM match logit, weight attention by
    the positive gradient, average the heads, then drop the image [CLS] column."""
    attention = model.text_encoder.encoder.layer[block_num].crossattention.self
    attention.save_attention = True
    try:
        image_embeds = model.visual_encoder(image)
        output = model.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask,
                                    encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
                                    return_dict=True)
        model.zero_grad()
        model.itm_head(output.last_hidden_state[:, 0])[:, 1].sum().backward()
        cam, grad = attention.get_attention_map().detach(), attention.get_attn_gradients()
    finally:
        attention.save_attention = False
    weighted = (cam * grad.clamp(min=0)).mean(dim=1)[0]     # (L, 1 + patches)
    return weighted[:, 1:].reshape(-1, 4, 4)


def at_picture_size(small):
    """A (4, 4) map as LoadedModel.gradcam draws it on the 40 x 24 picture: shifted to a minimum of
    0, divided by its maximum, resized bicubically, clipped to [0, 1]."""
    small = small - small.min()
    small = small / small.max()
    return np.clip(cv2.resize(small.numpy(), (40, 24), interpolation=cv2.INTER_CUBIC), 0, 1)


def direct_caption_map(model, image, tokens, block_num):
    """The mean of the word-piece rows ([CLS] left out) of `direct_token_maps`, drawn alike."""
    return at_picture_size(direct_token_maps(model, image, tokens, block_num)[1:].mean(dim=0))


def test_loaded_model_caption_map_is_the_direct_computation(make_model, tokenizer):
    model = make_model('retrieval').eval()
    loaded = LoadedModel(model, 'retrieval', dict(TINY_CONFIG), tokenizer, torch.device('cpu'))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    cam = loaded.gradcam(picture, 'a red circle on the left')   # the tiny model fuses at 2-3: block 2
    assert cam.words == ['a', 'red', 'circle', 'on', 'the', 'left']
    assert cam.caption_map.shape == (24, 40) and cam.caption_map.dtype == np.float32
    tokens = tokenizer('a red circle on the left', return_tensors='pt')
    expected = direct_caption_map(model, loaded.transform(picture).unsqueeze(0), tokens, 2)
    np.testing.assert_allclose(cam.caption_map, expected, atol=1e-5)
    # not the per-word maps' own average (each is scaled to [0, 1] first), nor the grounding map
    # (whose mean over all positions counts the [CLS] row)
    assert np.abs(cam.caption_map - to_unit(cam.maps.mean(axis=0))).max() > 1e-3
    grounding = gradcam.to_image_size(gradcam.itm_gradcam(model, loaded.transform(picture).unsqueeze(0),
                                                          tokens, 2)[1], 40, 24)[0]
    assert np.abs(cam.caption_map - grounding).max() > 1e-3


def to_unit(a):
    a = a - a.min()
    return a / a.max()


def test_each_word_piece_gets_its_own_map(make_model, tokenizer):
    """maps[i] is the Grad-CAM row of word piece words[i], the text position after [CLS] (i + 1):
    not [CLS]'s row nor a neighbour's."""
    model = make_model('retrieval').eval()
    loaded = LoadedModel(model, 'retrieval', dict(TINY_CONFIG), tokenizer, torch.device('cpu'))
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    caption = 'two small blue squares above a red circle'
    cam = loaded.gradcam(picture, caption)
    tokens = tokenizer(caption, return_tensors='pt')
    assert cam.words == [tokenizer.decode([i]) for i in tokens.input_ids[0, 1:].tolist()]
    assert tokens.input_ids[0, 0] == tokenizer.cls_token_id and len(cam.words) == len(cam.maps) == 8
    rows = direct_token_maps(model, loaded.transform(picture).unsqueeze(0), tokens, 2)
    expected = np.stack([at_picture_size(row) for row in rows])  # position 0: [CLS]
    for i in range(len(cam.words)):
        np.testing.assert_allclose(cam.maps[i], expected[i + 1], atol=1e-5, err_msg=f'word {i} ({cam.words[i]})')
    # neighbouring positions' maps differ, so a map one position off cannot pass
    assert min(np.abs(expected[i] - expected[i + 1]).max() for i in range(len(expected) - 1)) > 0.05
