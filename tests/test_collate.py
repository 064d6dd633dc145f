"""One batch per task, made by the loader (dataset/collate.py): each task's collate tokenises as the
scripts did in their steps, pre-training's MLM masks are drawn in the collate (the same draws as
the model's own, reproducible on resume), and the training loader counts skipped images itself."""
import copy

import pytest
import torch

import tasks
from conftest import TINY_CONFIG
from dataset import Batch, MaskedCaptionCollate, collate_for, vqa_collate_fn
from dataset.loaders import train_loader
from models.losses import mask_tokens

CAPTIONS = ['a red circle on the left', 'two blue squares', 'the small green triangle at the top of the picture',
            'there is a yellow circle']


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tokens(tokenizer, texts, **kwargs):
    return tokenizer(list(texts), return_tensors='pt', **{'padding': 'longest', **kwargs})


def same_text(a, b):
    return torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)


def test_every_task_record_names_a_collate_that_builds(tokenizer):
    for task in tasks.TASKS:
        for train in (True, False):
            assert callable(collate_for(task, tokenizer, TINY_CONFIG, train=train))


def test_fine_tuning_collates_tokenise_as_the_steps_did(tokenizer):
    image = images(4)
    retrieval = collate_for('retrieval', tokenizer, TINY_CONFIG)(list(zip(image, CAPTIONS, [3, 3, 0, 1])))
    assert isinstance(retrieval, Batch) and torch.equal(retrieval.image, image)
    assert same_text(retrieval.text, tokens(tokenizer, CAPTIONS, max_length=30)) and retrieval.idx.tolist() == [3, 3, 0, 1]
    evaluation = collate_for('retrieval', tokenizer, TINY_CONFIG, train=False)(list(zip(image, [5, 6, 7, 8])))
    assert evaluation.text is None and evaluation.idx.tolist() == [5, 6, 7, 8]

    ve = collate_for('ve', tokenizer, TINY_CONFIG, train=False)(list(zip(image, CAPTIONS, [2, 1, 0, 2])))
    assert same_text(ve.text, tokens(tokenizer, CAPTIONS)) and ve.targets.tolist() == [2, 1, 0, 2]
    nlvr = collate_for('nlvr', tokenizer, TINY_CONFIG)(list(zip(image, images(4, 1), CAPTIONS, [0, 1, 1, 0])))
    assert torch.equal(nlvr.image, torch.cat([image, images(4, 1)]))  # [image0 ; image1]

    grounding = collate_for('grounding', tokenizer, TINY_CONFIG, train=False)(list(zip(image, CAPTIONS, [9, 8, 7, 6])))
    assert same_text(grounding.text, tokens(tokenizer, CAPTIONS)) and grounding.ids == [9, 8, 7, 6]


def test_vqa_collate_wraps_vqa_collate_fn(tokenizer):
    items = list(zip(images(4), CAPTIONS, [['red[SEP]'], ['two[SEP]', 'three[SEP]'], ['yes[SEP]'], ['no[SEP]']],
                     [[1.0], [0.5, 0.5], [1.0], [1.0]]))
    image, questions, answers, weights, k = vqa_collate_fn(items)  # the public helper, unchanged
    for padding, expected in (('longest', tokens(tokenizer, questions, truncation=True, max_length=25)),
                              ('max_length', tokens(tokenizer, questions, padding='max_length', truncation=True,
                                                    max_length=25))):
        batch = collate_for('vqa', tokenizer, TINY_CONFIG, padding=padding)(items)
        assert same_text(batch.text, expected) and same_text(batch.answer, tokens(tokenizer, answers))
        assert torch.equal(batch.image, image) and torch.equal(batch.weights, weights) and batch.k == k
    test = collate_for('vqa', tokenizer, TINY_CONFIG, train=False)(list(zip(images(4), CAPTIONS, [11, 12, 13, 14])))
    assert same_text(test.text, tokens(tokenizer, CAPTIONS)) and test.ids == [11, 12, 13, 14]


def test_batch_to_moves_all_but_the_kept_fields(tokenizer):
    batch = Batch(image=images(2), text=tokens(tokenizer, CAPTIONS[:2]), k=[1, 2])
    moved = batch.to(torch.device('meta'), keep=('text',))
    assert moved.image.device.type == 'meta' and moved.text.input_ids.device.type == 'cpu' and moved.k == [1, 2]
    assert batch.image.device.type == 'cpu'  # the batch itself is untouched


def test_masks_drawn_in_the_collate_give_the_models_own_losses(make_model, tokenizer):
    """With the same random draws, masks from the collate (forward's `mlm`) and masks drawn inside
    the model (after the ITM noise) give the same losses."""
    model = make_model('pretrain').eval()  # no dropout: the ITM noise and the masks are all the draws
    image, text = images(4), tokens(tokenizer, CAPTIONS, truncation=True, max_length=25)
    torch.manual_seed(3)
    inside = copy.deepcopy(model)(image, text, alpha=0.4)
    torch.manual_seed(3)
    model.draw_itm_noise(4, image.device)  # the forward draws this first
    input_ids, labels = text.input_ids.clone(), text.input_ids.clone()
    mask_tokens(input_ids, model.text_encoder.config.vocab_size, tokenizer.pad_token_id, tokenizer.cls_token_id,
                tokenizer.mask_token_id, targets=labels, probability_matrix=torch.full(labels.shape, 0.15))
    assert (labels != -100).any() and torch.equal(text.input_ids, input_ids.where(labels == -100, text.input_ids))
    torch.manual_seed(3)
    given = copy.deepcopy(model)(image, text, alpha=0.4, mlm=(input_ids, labels))
    for a, b in zip(inside, given):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    labels = labels.masked_fill(labels != -100, -100).index_fill(1, torch.tensor([2]), 0)  # other masks
    torch.manual_seed(3)
    other = copy.deepcopy(model)(image, text, alpha=0.4, mlm=(input_ids, labels))
    assert other[0] != inside[0] and other[1:] == inside[1:]  # the MLM loss is the given masks'


class Captions(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.zeros(3, 4, 4, dtype=torch.uint8), f'{CAPTIONS[i % 4]} number {i}'


def masks_of(loader, epoch, start=0):
    loader.sampler.set_epoch(epoch, start=start)
    return [batch.mlm for batch in loader]


@pytest.mark.parametrize('workers', [0, 2])
def test_collate_masks_are_the_same_on_a_resumed_run(tokenizer, workers):
    collate = MaskedCaptionCollate(tokenizer, 0.5, tokenizer.vocab_size)
    loader = train_loader(Captions(), 4, {'num_workers': workers}, seed=7, collate_fn=collate)
    torch.manual_seed(0)
    epoch = masks_of(loader, 2)
    assert len(epoch) == 4
    torch.manual_seed(1)  # whatever the main process's generator holds
    resumed = masks_of(loader, 2, start=2 * 4)  # from step 2
    assert all(torch.equal(a, b) for old, new in zip(epoch[2:], resumed) for a, b in zip(old, new))
    other = masks_of(loader, 3)
    assert not all(torch.equal(old[1], new[1]) for old, new in zip(epoch, other))  # a new epoch, new masks


class Flaky(torch.utils.data.Dataset):
    """Every third item is 'bad': the dataset skips it (as skip_bad_images does) and counts it."""
    def __init__(self):
        self.num_skipped = 0

    def __len__(self):
        return 12

    def __getitem__(self, i):
        if i % 3 == 0:
            self.num_skipped += 1
        return torch.zeros(2), i


def test_training_loader_yields_plain_batches_and_counts_skips():
    loader = train_loader(Flaky(), 3, {'num_workers': 0, 'skip_bad_images': True}, seed=0)
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 4 and all(torch.is_tensor(b[0]) for b in batches) and loader.skipped == 4
    loader.sampler.set_epoch(1)
    next(iter(loader))
    assert loader.skipped < 4  # counted afresh each epoch
    assert train_loader(Flaky(), 3, {'num_workers': 0}, seed=0).skipped is None  # nothing skipped, no count
