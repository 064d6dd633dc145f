"""ALBEF's BERT tokenizer: a thin wrapper over the fast transformers BertTokenizer.

The one behavioural difference from stock BERT: a single text is encoded as
``[CLS] tokens`` with NO trailing ``[SEP]`` (deliberate in ALBEF, see
docs/DESIGN.md, "Tokenizer"). Consequently the special-token budget is 1, so ``truncation=True,
max_length=M`` keeps at most ``M - 1`` word pieces plus [CLS].

Everything else is stock uncased BERT: basic tokenisation (clean text, CJK
spacing, lowercase, accent stripping, punctuation split), greedy WordPiece,
and special strings such as ``[SEP]`` or ``[MASK]`` written literally in the
text are matched case-sensitively, before lowercasing, even when glued to a
word (``"yes[SEP]"`` -> ``[CLS] yes [SEP]``, used for VQA answers).
"""
import os

import torch
import transformers

# transformers 5.x: BertTokenizer *is* the tokenizers-backed (fast) class and
# BertTokenizerFast is an alias; 4.x has both as distinct classes.
_HFTokenizer = getattr(transformers, 'BertTokenizerFast', transformers.BertTokenizer)

_PADDING = {True: 'longest', 'longest': 'longest', 'max_length': 'max_length',
            False: None, None: None, 'do_not_pad': None}


class TokenizerOutput(dict):
    """Dict of tensors (or lists) with attribute access and a copying ``.to``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device):
        """Return a copy with every tensor moved to ``device``."""
        return TokenizerOutput({k: v.to(device) if torch.is_tensor(v) else v
                                for k, v in self.items()})


class BertTokenizer:
    """ALBEF tokenizer (``[CLS] text``, no trailing ``[SEP]``) wrapping a fast HF tokenizer.

    Attributes not defined here (``tokenize``, ``convert_tokens_to_ids``,
    ``unk_token_id``, ...) are forwarded to the wrapped tokenizer ``self.hf``.
    """

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path, **kw):
        """Load from a hub name (e.g. 'bert-base-uncased') or a local directory.

        A directory holding only ``vocab.txt`` is accepted: the fast tokenizer
        is then built from the vocabulary with lowercasing on.
        """
        if os.path.isdir(name_or_path) and not any(
                os.path.exists(os.path.join(name_or_path, f))
                for f in ('tokenizer.json', 'tokenizer_config.json')):
            kw.setdefault('do_lower_case', True)
        return cls(_HFTokenizer.from_pretrained(name_or_path, **kw))

    # ------------------------------------------------------------------ ids
    pad_token_id = property(lambda self: self.hf.pad_token_id)
    cls_token_id = property(lambda self: self.hf.cls_token_id)
    sep_token_id = property(lambda self: self.hf.sep_token_id)
    mask_token_id = property(lambda self: self.hf.mask_token_id)
    vocab_size = property(lambda self: self.hf.vocab_size)

    def __len__(self):
        return len(self.hf)

    def __getattr__(self, name):
        if name.startswith('_') or name == 'hf':  # keeps pickling/copy safe
            raise AttributeError(name)
        return getattr(self.hf, name)

    def __repr__(self):
        return f'{type(self).__name__}({self.hf.name_or_path!r}, vocab_size={len(self)})'

    # ------------------------------------------------------------- decoding
    def decode(self, ids, **kw):
        return self.hf.decode(ids.tolist() if torch.is_tensor(ids) else ids, **kw)

    def batch_decode(self, sequences, **kw):
        return [self.decode(s, **kw) for s in sequences]

    def convert_ids_to_tokens(self, ids, **kw):
        return self.hf.convert_ids_to_tokens(ids.tolist() if torch.is_tensor(ids) else ids, **kw)

    # ------------------------------------------------------------- encoding
    def __call__(self, text, padding=False, truncation=None, max_length=None,
                 return_tensors='pt'):
        """Encode ``text`` (a str or a sequence of str) as ``[CLS] pieces``.

        padding: 'longest'/True pads to the longest text of the batch,
            'max_length' to ``max_length``, False/None/'do_not_pad' not at all.
        truncation: True (or any HF strategy name) keeps at most
            ``max_length - 1`` pieces. As in HF, ``max_length`` alone is
            ignored when padding is set, and truncates when padding and
            truncation are both unset. ``truncation=False`` never truncates.
        return_tensors: 'pt' for LongTensors, None for Python lists.

        Returns a ``TokenizerOutput`` with ``input_ids`` and ``attention_mask``
        (1 on real tokens, 0 on right-side [PAD]).
        """
        if padding not in _PADDING:
            raise ValueError(f'unsupported padding={padding!r}')
        padding = _PADDING[padding]
        if truncation is None:  # HF fallback: max_length alone truncates only without padding
            truncation = max_length is not None and padding is None
        if truncation == 'do_not_truncate':
            truncation = False
        if return_tensors not in ('pt', None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if (truncation or padding == 'max_length') and max_length is None:
            max_length = self.hf.model_max_length

        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pieces = self.hf(texts, add_special_tokens=False, return_attention_mask=False,
                         return_token_type_ids=False)['input_ids'] if texts else []
        if truncation:
            pieces = [p[:max(max_length - 1, 0)] for p in pieces]
        ids = [[self.cls_token_id] + p for p in pieces]

        if padding is not None:
            width = max_length if padding == 'max_length' else max(map(len, ids), default=0)
            mask = [[1] * len(x) + [0] * (width - len(x)) for x in ids]
            ids = [x + [self.pad_token_id] * (width - len(x)) for x in ids]
        else:
            mask = [[1] * len(x) for x in ids]

        if return_tensors == 'pt':
            if len({len(x) for x in ids}) > 1:
                raise ValueError('texts have different lengths; use padding=\'longest\' '
                                 '(or truncation=True with padding=\'max_length\')')
            ids = torch.tensor(ids, dtype=torch.long).reshape(len(ids), -1)
            mask = torch.tensor(mask, dtype=torch.long).reshape(len(mask), -1)
        if single and return_tensors is None:
            ids, mask = ids[0], mask[0]
        return TokenizerOutput(input_ids=ids, attention_mask=mask)
