"""ALBEF tokenizer behaviour (docs/DESIGN.md, "Tokenizer")."""
import os
import pickle
import shutil

import pytest
import torch

from models.tokenization_bert import BertTokenizer

CLS, SEP, PAD, MASK = 101, 102, 0, 103


def ids(tok, text, **kw):
    return tok(text, **kw).input_ids[0].tolist()


def test_special_ids(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id,
            tokenizer.sep_token_id, tokenizer.mask_token_id) == (PAD, CLS, SEP, MASK)
    assert tokenizer.vocab_size == len(tokenizer) == 30522


@pytest.mark.parametrize('text, expected', [
    ('a man riding a horse', [CLS, 1037, 2158, 5559, 1037, 3586]),
    ('yes[SEP]', [CLS, 2748, SEP]),
    ('on the beach[SEP]', [CLS, 2006, 1996, 3509, SEP]),
    ('a[SEP]', [CLS, 1037, SEP]),
    ('yes[sep]', [CLS, 2748, 1031, 19802, 1033]),  # case-sensitive special match
    ("a man's dog, walking. (hi)!",
     [CLS, 1037, 2158, 1005, 1055, 3899, 1010, 3788, 1012, 1006, 7632, 1007, 999]),
    ('naïve café', [CLS, 15743, 7668]),
    ('[MASK]x [UNK] [PAD][CLS]', [CLS, MASK, 1060, 100, PAD, CLS]),
    ('', [CLS]),
])
def test_encoding(tokenizer, text, expected):
    assert ids(tokenizer, text) == expected


def test_no_trailing_sep(tokenizer):
    out = ids(tokenizer, 'a man riding a horse')
    assert out[0] == CLS and SEP not in out


def test_accents_stripped(tokenizer):
    assert ids(tokenizer, 'naïve café') == ids(tokenizer, 'naive cafe')


def test_truncation_keeps_max_length_minus_one_pieces(tokenizer):
    out = tokenizer('a b c d e f g h', truncation=True, max_length=5)
    assert tokenizer.convert_ids_to_tokens(out.input_ids[0]) == ['[CLS]', 'a', 'b', 'c', 'd']
    long_text = ' '.join(['horse'] * 40)
    out = tokenizer(long_text, padding='longest', truncation=True, max_length=25)
    assert out.input_ids.shape == (1, 25) and (out.input_ids[0, 1:] == 3586).all()


def test_truncation_counts_word_pieces(tokenizer):
    pieces = tokenizer.tokenize('unaffable')
    assert len(pieces) > 1
    out = ids(tokenizer, 'unaffable', truncation=True, max_length=2)
    assert out == [CLS, tokenizer.convert_tokens_to_ids(pieces[0])]


def test_max_length_without_truncation_is_ignored_when_padding(tokenizer):
    texts = [' '.join(['a'] * 10), 'a b']
    out = tokenizer(texts, padding='longest', max_length=5)
    assert out.input_ids.shape == (2, 11)


def test_max_length_alone_truncates_like_hf(tokenizer):
    out = tokenizer('a b c d e f g h', max_length=5)
    assert out.input_ids.shape == (1, 5)
    out = tokenizer('a b c d e f g h', max_length=5, truncation=False)
    assert out.input_ids.shape == (1, 9)


def test_padding_longest(tokenizer):
    out = tokenizer(['a man riding a horse', 'a dog', 'yes[SEP]'], padding='longest')
    assert out.input_ids.dtype == out.attention_mask.dtype == torch.long
    assert out.input_ids.shape == out.attention_mask.shape == (3, 6)
    assert out.input_ids[1].tolist() == [CLS, 1037, 3899, PAD, PAD, PAD]
    assert out.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert tokenizer(['a dog'], padding=True).input_ids.shape == (1, 3)


def test_padding_max_length(tokenizer):
    out = tokenizer(['a dog', ' '.join(['horse'] * 50)], padding='max_length',
                    truncation=True, max_length=30)
    assert out.input_ids.shape == out.attention_mask.shape == (2, 30)
    assert out.attention_mask[0].sum() == 3 and out.attention_mask[1].sum() == 30
    assert (out.input_ids[0, 3:] == PAD).all()


def test_ragged_without_padding_raises(tokenizer):
    with pytest.raises(ValueError):
        tokenizer(['a dog', 'a man riding a horse'])
    lists = tokenizer(['a dog', 'a b c'], return_tensors=None)
    assert lists.input_ids == [[CLS, 1037, 3899], [CLS, 1037, 1038, 1039]]


def test_output_object(tokenizer):
    out = tokenizer(('a dog', 'a cat'), padding='longest')  # tuples come from DataLoader collation
    assert out['input_ids'] is out.input_ids
    moved = out.to('cpu')
    assert moved is not out and set(moved) == {'input_ids', 'attention_mask'}
    assert torch.equal(moved.input_ids, out.input_ids)
    assert moved.attention_mask.device.type == 'cpu'
    with pytest.raises(AttributeError):
        out.token_type_ids


def test_decode(tokenizer):
    out = tokenizer('A man riding[SEP]')
    assert tokenizer.decode(out.input_ids[0]) == '[CLS] a man riding [SEP]'
    assert tokenizer.decode(out.input_ids[0], skip_special_tokens=True) == 'a man riding'
    assert tokenizer.convert_ids_to_tokens([CLS, 2748]) == ['[CLS]', 'yes']


def test_vocab_only_directory(minilm_dir, tmp_path, tokenizer):
    shutil.copy(os.path.join(minilm_dir, 'vocab.txt'), tmp_path / 'vocab.txt')
    tok = BertTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 30522 and tok.mask_token_id == MASK
    for text in ['Yes[SEP]', 'on the beach[SEP]', 'yes[sep]', 'Naïve café', "a man's dog, (hi)!"]:
        assert ids(tok, text) == ids(tokenizer, text)


def test_picklable(tokenizer):
    tok = pickle.loads(pickle.dumps(tokenizer))
    assert ids(tok, 'yes[SEP]') == [CLS, 2748, SEP]
