"""VQA as answer generation: a 6-layer BERT decoder, initialised from the fusion layers, scores the
candidate answers conditioned on the multimodal question states
(docs/DESIGN.md, "VQA model and answer ranking")."""
import torch
import torch.nn.functional as F

from utils import to_device
from .base import ALBEFBase
from .losses import lm_loss
from .xbert import BertLMHeadModel


def tile(x, dim, n_tile):
    """Repeat each slice along `dim` n_tile times in place (a, a, b, b, ...)."""
    return torch.repeat_interleave(x, n_tile, dim=dim)


class ALBEF(ALBEFBase):
    checkpoint_conversion = 'vqa'  # from a pre-training checkpoint (models/checkpoint.py)

    def __init__(self, text_encoder=None, text_decoder=None, tokenizer=None, config=None):
        super().__init__(config, tokenizer, text_encoder)
        self.distill = config['distill']
        # as many layers as the fusion encoder, each cross-attending to the question states
        encoder_config = self.text_encoder.config
        self.text_decoder = self.build_text_encoder(
            config, text_decoder, BertLMHeadModel, fusion_layer=0, encoder_width=encoder_config.hidden_size,
            num_hidden_layers=encoder_config.num_hidden_layers - encoder_config.fusion_layer)
        if self.distill:
            self.momentum = 0.995
            self._create_momentum('visual_encoder', 'text_encoder', 'text_decoder')

    def _question_states(self, visual_encoder, text_encoder, image, question):
        image_embeds = visual_encoder(image)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        return text_encoder(question.input_ids, attention_mask=question.attention_mask,
                            encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                            return_dict=True).last_hidden_state

    def forward(self, image, quesiton, answer=None, alpha=0, k=None, weights=None, train=True, update_momentum=True):
        question = quesiton  # the original keyword is spelled this way; scripts pass it positionally
        question_output = self._question_states(self.visual_encoder, self.text_encoder, image, question)
        if not train:
            return self.rank_answer(question_output, question.attention_mask, answer.input_ids,
                                    answer.attention_mask, k)

        # one row per (question, answer): question b repeated k[b] times
        # (the total is known on the host: given as output_size, repeat_interleave reads nothing back)
        counts = k.tolist() if torch.is_tensor(k) else [int(n) for n in k]
        repeats = to_device(torch.tensor(counts, dtype=torch.long), question_output.device)
        rows = sum(counts)
        question_states = torch.repeat_interleave(question_output, repeats, dim=0, output_size=rows)
        question_atts = torch.repeat_interleave(question.attention_mask, repeats, dim=0, output_size=rows)
        answer_targets = answer.input_ids.masked_fill(answer.input_ids == self.tokenizer.pad_token_id, -100)

        soft_labels = None
        if self.distill:
            with torch.no_grad():
                if update_momentum:
                    self._momentum_update()
                question_output_m = self._question_states(self.visual_encoder_m, self.text_encoder_m, image, question)
                question_states_m = torch.repeat_interleave(question_output_m, repeats, dim=0, output_size=rows)
                logits_m = self.text_decoder_m(answer.input_ids, attention_mask=answer.attention_mask,
                                               encoder_hidden_states=question_states_m,
                                               encoder_attention_mask=question_atts, return_logits=True)
                soft_labels = F.softmax(logits_m, dim=-1)
        answer_output = self.text_decoder(answer.input_ids, attention_mask=answer.attention_mask,
                                          encoder_hidden_states=question_states, encoder_attention_mask=question_atts,
                                          return_dict=True)
        answer_loss = lm_loss(answer_output.logits, answer_targets, soft_labels, alpha, reduction='none')
        return (weights * answer_loss).sum() / image.size(0)

    def rank_answer(self, question_states, question_atts, answer_ids, answer_atts, k):
        """Top-k answers of each question: shortlist by the first answer token, then score the whole
        answer. Returns (topk_ids into the answer list, topk_probs), each (num_questions, k).

        As in the original, the first token's log-probability is counted twice (once from the
        shortlist, once inside the whole-answer NLL).
        """
        num_ques = question_states.size(0)
        start_ids = answer_ids[0, 0].repeat(num_ques, 1)  # [CLS]
        start_output = self.text_decoder(start_ids, encoder_hidden_states=question_states,
                                         encoder_attention_mask=question_atts, return_dict=True)
        logits = start_output.logits[:, 0, :]
        answer_first_token = answer_ids[:, 1]
        prob_first_token = F.softmax(logits, dim=1).index_select(dim=1, index=answer_first_token)
        topk_probs, topk_ids = prob_first_token.topk(k, dim=1)

        # (num_ques * k, La): the k shortlisted answers of each question, question by question
        input_ids = answer_ids[topk_ids.reshape(-1)]
        input_atts = answer_atts[topk_ids.reshape(-1)]
        targets_ids = input_ids.masked_fill(input_ids == self.tokenizer.pad_token_id, -100)
        question_states = tile(question_states, 0, k)
        question_atts = tile(question_atts, 0, k)
        output = self.text_decoder(input_ids, attention_mask=input_atts, encoder_hidden_states=question_states,
                                   encoder_attention_mask=question_atts, return_dict=True)
        answer_loss = lm_loss(output.logits, targets_ids, reduction='none').view(input_ids.size(0), -1)

        log_probs = torch.cat([topk_probs.log().view(-1, 1), -answer_loss], dim=1).sum(1).view(num_ques, k)
        topk_probs = F.softmax(log_probs, dim=1)
        topk_probs, rerank_id = topk_probs.topk(k, dim=1)
        topk_ids = torch.gather(topk_ids, 1, rerank_id)
        return topk_ids, topk_probs
