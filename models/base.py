"""What the six ALBEF variants share (docs/DESIGN.md, "Momentum encoders and feature queues"):
encoder builders, momentum pairs, queues and the
contrastive + matching objectives of pre-training and retrieval.

The base registers nothing of its own: every submodule and buffer is assigned onto the model under
its original name, so the state_dict keys are exactly those of the original checkpoints.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from utils import concat_all_gather
from .losses import distill_targets, hard_negative_weights, itc_loss, sample_negatives
from .vit import VisionTransformer, load_deit, DEIT_BASE_URL
from .xbert import BertConfig, BertModel, Packing

VISION_DEFAULTS = {'vision_width': 768, 'vision_depth': 12, 'vision_num_heads': 12, 'patch_size': 16}


def read_bert_config(config, **overrides):
    """The BERT config of `config['bert_config']` (a JSON path or a dict), with task overrides."""
    source = config['bert_config']
    bert_config = BertConfig.from_dict(source) if isinstance(source, dict) else BertConfig.from_json_file(source)
    for key, value in overrides.items():
        setattr(bert_config, key, value)
    vision_width = config.get('vision_width', VISION_DEFAULTS['vision_width'])
    if 'encoder_width' not in overrides and getattr(bert_config, 'encoder_width', None) != vision_width:
        raise ValueError(f"bert_config encoder_width={getattr(bert_config, 'encoder_width', None)} must equal "
                         f'vision_width={vision_width}: the cross-attention reads the image tokens')
    return bert_config


class ALBEFBase(nn.Module):
    checkpoint_conversion = None  # how models/checkpoint.py converts a pre-training checkpoint
    new_heads = ()                # heads a pre-trained checkpoint does not have
    model_pairs = ()              # (online, momentum) module pairs: none without momentum encoders

    def __init__(self, config, tokenizer=None, text_encoder=None, text_cls=BertModel, init_deit=False,
                 **bert_overrides):
        """What every variant has: `tokenizer`, the ViT `visual_encoder` (from DeiT with
        `init_deit`) and the BERT `text_encoder` of class `text_cls` (see build_text_encoder)."""
        super().__init__()
        self.tokenizer = tokenizer
        self.visual_encoder = self.build_visual_encoder(config)
        if init_deit:
            self.init_deit(config)
        self.text_encoder = self.build_text_encoder(config, text_encoder, text_cls, **bert_overrides)

    # ---- builders ---------------------------------------------------------------------------
    @staticmethod
    def build_visual_encoder(config):
        """ViT sized by the config (defaults: ViT-B/16), with all dropout rates 0."""
        size = {k: config.get(k, v) for k, v in VISION_DEFAULTS.items()}
        return VisionTransformer(img_size=config['image_res'], patch_size=size['patch_size'],
                                 embed_dim=size['vision_width'], depth=size['vision_depth'],
                                 num_heads=size['vision_num_heads'], mlp_ratio=4, qkv_bias=True)

    @staticmethod
    def build_text_encoder(config, text_encoder=None, cls=BertModel, **overrides):
        """A BERT of class `cls` from `config['bert_config']` (plus overrides). `text_encoder` (a hub
        name or local directory) loads pretrained BERT weights; None keeps a random init."""
        bert_config = read_bert_config(config, **overrides)
        kwargs = {'add_pooling_layer': False} if cls is BertModel else {}
        if text_encoder:
            return cls.from_pretrained(text_encoder, config=bert_config, **kwargs)
        return cls(bert_config, **kwargs)

    def init_deit(self, config):
        """Initialise `visual_encoder` from DeiT (config key `deit_checkpoint`: a file or URL)."""
        load_deit(self.visual_encoder, config.get('deit_checkpoint') or DEIT_BASE_URL)

    def _build_projections(self, embed_dim, temp):
        """`vision_proj` and `text_proj` onto the embed_dim space of the contrastive features, and
        the learnable temperature `temp` (initial value `temp`)."""
        self.vision_proj = nn.Linear(self.visual_encoder.embed_dim, embed_dim)
        self.text_proj = nn.Linear(self.text_encoder.config.hidden_size, embed_dim)
        self.temp = nn.Parameter(torch.ones([]) * temp)

    # ---- momentum encoders ------------------------------------------------------------------
    def _create_momentum(self, *names):
        """Create `<name>_m` as a copy of each named module and pair them for the EMA."""
        self.model_pairs = []
        for name in names:
            online = getattr(self, name)
            setattr(self, name + '_m', copy.deepcopy(online))
            self.model_pairs.append([online, getattr(self, name + '_m')])
        self.copy_params()

    @torch.no_grad()
    def copy_params(self):
        for model, model_m in self.model_pairs:
            for param, param_m in zip(model.parameters(), model_m.parameters()):
                param_m.data.copy_(param.data)
                param_m.requires_grad = False

    @torch.no_grad()
    def _momentum_update(self):
        """theta_m <- m theta_m + (1 - m) theta. The forwards call it unless given
        `update_momentum=False` (gradient accumulation: the training loop asks for it on the first
        micro-batch of each optimizer step only)."""
        online, momentum, frozen, frozen_m = [], [], [], []
        for model, model_m in self.model_pairs:
            for param, param_m in zip(model.parameters(), model_m.parameters()):
                (online if param.requires_grad else frozen).append(param.detach())
                (momentum if param.requires_grad else frozen_m).append(param_m.detach())
        if frozen:  # a frozen parameter (models/freeze.py) is its own average: the copy is set equal to it
            torch._foreach_copy_(frozen_m, frozen)
        # theta_m <- m theta_m + (1 - m) theta = theta_m + (1 - m) (theta - theta_m), over all
        # parameters in one pass: it reads both and writes theta_m once, with no temporary (the
        # original's per-parameter loop writes theta_m twice plus a theta-sized temporary). Equal to
        # the original within float32 rounding (a test), not bit for bit: the rounding order differs.
        torch._foreach_lerp_(momentum, online, 1. - self.momentum)

    def set_grad_checkpointing(self, enable=True):
        """Recompute the activations of the online ViT blocks and BERT layers in the backward pass
        instead of storing them. The momentum encoders (no gradients) are not touched; the
        online and momentum modules stay separate objects with separate weights."""
        for name, module in self.named_children():
            if name.endswith('_m'):
                continue
            if hasattr(module, 'set_grad_checkpointing'):  # timm's ViT
                module.set_grad_checkpointing(enable)
            elif hasattr(module, 'set_gradient_checkpointing'):  # BERT encoder or decoder
                module.set_gradient_checkpointing(enable)

    # ---- feature queues ---------------------------------------------------------------------
    def _create_queues(self, embed_dim, queue_size, with_idx=False):
        self.register_buffer('image_queue', F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer('text_queue', F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        if with_idx:
            self.register_buffer('idx_queue', torch.full((1, queue_size), -100))
        self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat, text_feat, idx=None):
        image_feats = concat_all_gather(image_feat)
        text_feats = concat_all_gather(text_feat)
        batch_size = image_feats.shape[0]
        if self.queue_size % batch_size:
            raise ValueError(f'queue_size {self.queue_size} must be a multiple of the global batch size '
                             f'{batch_size} (batch size per process x processes)')
        # the columns ptr .. ptr + batch_size - 1, computed on the device: the pointer is never read
        # back to the host. The queues stay float32 whatever precision the features come in.
        columns = self.queue_ptr + torch.arange(batch_size, device=self.queue_ptr.device)
        self.image_queue.index_copy_(1, columns, image_feats.T.to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, columns, text_feats.T.to(self.text_queue.dtype))
        if idx is not None:
            self.idx_queue.index_copy_(1, columns, concat_all_gather(idx).T.to(self.idx_queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + batch_size) % self.queue_size)


class ContrastiveALBEF(ALBEFBase):
    """ITC with momentum distillation and ITM with hard negatives, shared by pre-training
    (positives = the diagonal) and retrieval (positives = every caption of the same image)."""

    itm_eps = 0.0  # retrieval adds 1e-4 before the sampling softmax (bit-level parity)

    def __init__(self, config, tokenizer=None, text_encoder=None, text_cls=BertModel, init_deit=False,
                 with_idx=False, momentum=True):
        """The encoders, then the projections and temperature, `itm_head`, the momentum encoders
        and the feature queues (with `idx_queue` for retrieval's image indices: `with_idx`).
        `momentum=False` builds neither momentum encoders nor queues: they serve training only
        (models.load builds its models so)."""
        super().__init__(config, tokenizer, text_encoder, text_cls, init_deit)
        self._build_projections(config['embed_dim'], config['temp'])
        self.momentum = config['momentum']
        self.itm_head = nn.Linear(self.text_encoder.config.hidden_size, 2)
        if momentum:  # the momentum encoders exist even without distillation: they fill the queues
            self.queue_size = config['queue_size']
            self._create_momentum('visual_encoder', 'vision_proj', 'text_encoder', 'text_proj')
            self._create_queues(config['embed_dim'], self.queue_size, with_idx=with_idx)

    def _text_bert(self, encoder):
        return encoder.base_model  # BertModel for retrieval, `.bert` of BertForMaskedLM for pre-training

    def _image_features(self, visual_encoder, vision_proj, image):
        image_embeds = visual_encoder(image)
        return image_embeds, F.normalize(vision_proj(image_embeds[:, 0, :]), dim=-1)

    def _text_features(self, text_encoder, text_proj, text):
        text_embeds = self._text_bert(text_encoder)(text.input_ids, attention_mask=text.attention_mask,
                                                    return_dict=True, mode='text').last_hidden_state
        return text_embeds, F.normalize(text_proj(text_embeds[:, 0, :]), dim=-1)

    def _fusion(self, text_embeds, text_atts, image_embeds, image_atts, image_index=None):
        """The multimodal [CLS] of each text; row b attends to image image_index[b] (default b)."""
        return self._text_bert(self.text_encoder)(
            encoder_embeds=text_embeds, attention_mask=text_atts, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts, return_dict=True, mode='fusion',
            encoder_index=image_index).last_hidden_state[:, 0, :]

    def _similarities(self, feat, feat_all):
        """feat (B, E) against feat_all (E, B + queue) / temp, in float32 even under bf16/fp16
        autocast: a softmax over 65,536 logits of about 1/0.07 = 14 each is quantised in bf16 (8 bits
        of mantissa), and the matrix is small (B x 65k x 256 multiply-adds)."""
        with torch.autocast(feat.device.type, enabled=False):
            return feat.float() @ feat_all.float() / self.temp

    def contrastive_forward(self, image, text, alpha, idx=None, distill=True, mlm_input_ids=None, itm_noise=None,
                            host_mask=None, mlm_positions=None, update_momentum=True):
        """Returns (loss_ita, loss_itm, image_embeds, image_embeds_m) for one batch.

        `idx` (B,) are image indices (retrieval); None means pre-training's diagonal positives.
        With `mlm_input_ids` (B, L: the masked copy of text.input_ids, on the device) the masked
        captions share the text and fusion passes (see _joint_passes) and the last two entries are
        instead the MLM fusion outputs (B, L, width), online and momentum. `itm_noise`: the ITM
        negatives' random draws, made beforehand (see draw_itm_noise). `host_mask`: a CPU copy of
        text.attention_mask, from which the text and fusion passes on another device learn which
        tokens to skip (xbert.Packing) without reading the device. `mlm_positions` (M,: flat
        positions b * L + l of the tokens the MLM head reads, on the device): the MLM outputs are
        then those tokens' alone, (M, width), and the last fusion layer computes no others.
        `update_momentum`: see _momentum_update.
        """
        if host_mask is not None and image.device.type == 'cpu':
            host_mask = None  # the passes find the tokens from the mask itself
        bs = image.size(0)
        image_embeds, image_feat = self._image_features(self.visual_encoder, self.vision_proj, image)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        text_packing = None
        if host_mask is not None and mlm_input_ids is not None:
            text_packing = Packing(torch.cat([host_mask, host_mask]), image.device)
        text_embeds, text_feat, mlm_embeds = self._text_pass(self.text_encoder, self.text_proj, text, mlm_input_ids,
                                                             text_packing)

        if idx is not None:
            idx = idx.view(-1, 1)
            idx_all = torch.cat([idx.t(), self.idx_queue.clone().detach()], dim=1)
            pos = torch.eq(idx, idx_all).float()
            sim_targets = pos / pos.sum(1, keepdim=True)

        with torch.no_grad():
            if update_momentum:
                self._momentum_update()
            image_embeds_m, image_feat_m = self._image_features(self.visual_encoder_m, self.vision_proj_m, image)
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            _, text_feat_m, mlm_embeds_m = self._text_pass(self.text_encoder_m, self.text_proj_m, text,
                                                          mlm_input_ids, text_packing)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            if idx is None:
                sim_targets = torch.zeros(bs, image_feat_all.size(1), device=image.device)
                sim_targets.fill_diagonal_(1)
            if distill:
                sim_i2t_targets = distill_targets(self._similarities(image_feat_m, text_feat_all), sim_targets, alpha)
                sim_t2i_targets = distill_targets(self._similarities(text_feat_m, image_feat_all), sim_targets, alpha)
            else:
                sim_i2t_targets = sim_t2i_targets = sim_targets
            if mlm_input_ids is not None:  # the momentum model's MLM rows: its one fusion pass
                packing = Packing(host_mask, image.device) if host_mask is not None else None
                mlm_out_m = self._fusion_states(self.text_encoder_m, mlm_embeds_m, text.attention_mask,
                                                image_embeds_m, None, packing, mlm_positions)

        sim_i2t = self._similarities(image_feat, text_feat_all)
        sim_t2i = self._similarities(text_feat, image_feat_all)
        with torch.autocast(image.device.type, enabled=False):  # float32 log-softmax over the queue
            loss_ita = itc_loss(sim_i2t, sim_t2i, sim_i2t_targets, sim_t2i_targets)

        self._dequeue_and_enqueue(image_feat_m, text_feat_m, idx)

        if mlm_input_ids is None:
            loss_itm = self._itm_loss(image_embeds, image_atts, text_embeds, text.attention_mask,
                                      sim_i2t, sim_t2i, idx)
            return loss_ita, loss_itm, image_embeds, image_embeds_m
        loss_itm, mlm_out = self._itm_loss(image_embeds, image_atts, text_embeds, text.attention_mask,
                                           sim_i2t, sim_t2i, idx, noise=itm_noise, extra_rows=mlm_embeds,
                                           host_mask=host_mask, extra_positions=mlm_positions)
        return loss_ita, loss_itm, mlm_out, mlm_out_m

    def _text_pass(self, text_encoder, text_proj, text, mlm_input_ids=None, packing=None):
        """(text_embeds, text_feat, mlm_embeds): the text layers run once over the captions and,
        when given, their masked copies stacked under them (2B rows; rows do not interact)."""
        if mlm_input_ids is None:
            return (*self._text_features(text_encoder, text_proj, text), None)
        bs = mlm_input_ids.size(0)
        both = torch.cat([text.input_ids, mlm_input_ids])
        mask = torch.cat([text.attention_mask, text.attention_mask])
        states = self._text_bert(text_encoder)(both, attention_mask=mask, return_dict=True, mode='text',
                                               packing=packing).last_hidden_state
        text_embeds, mlm_embeds = states[:bs], states[bs:]
        return text_embeds, F.normalize(text_proj(text_embeds[:, 0, :]), dim=-1), mlm_embeds

    def _fusion_states(self, text_encoder, text_embeds, text_atts, image_embeds, image_index=None, packing=None,
                       output_positions=None):
        """The fusion layers' outputs (rows, L, width); row b attends to image image_index[b]. With
        `output_positions` (flat positions b * L + l) only those tokens' outputs, (S, width)."""
        return self._text_bert(text_encoder)(
            encoder_embeds=text_embeds, attention_mask=text_atts, encoder_hidden_states=image_embeds,
            encoder_attention_mask=None, return_dict=True, mode='fusion',
            encoder_index=image_index, packing=packing, output_positions=output_positions).last_hidden_state

    @staticmethod
    def draw_itm_noise(batch_size, device):
        """The exponential noise of the two ITM negative draws (see losses.sample_negatives), in
        the order _itm_loss uses it: a negative image for each text, then a text for each image.
        Drawn ahead, it lets pre-training draw its MLM masks (on the CPU generator) after it, as
        the original does, while the masked text already goes through the first text pass."""
        return [torch.empty(batch_size, batch_size, device=device).exponential_(1) for _ in range(2)]

    def _itm_loss(self, image_embeds, image_atts, text_embeds, text_atts, sim_i2t, sim_t2i, idx,
                  noise=None, extra_rows=None, host_mask=None, extra_positions=None):
        """ITM over B positive pairs and 2B hard negatives (a negative image for each text, a
        negative text for each image), in the original's order [positives; negatives].

        `extra_rows` (B, L, width; pre-training's masked captions, with the same mask as the
        captions) go through the same fusion pass, each with its own image; their outputs are
        then returned too: (loss_itm, fusion outputs of the extra rows; with `extra_positions`,
        flat positions b * L + l in the extra rows, those tokens' outputs only). With `host_mask` (the
        CPU copy of text_atts) the pass skips the padding of every row whose caption the host
        knows; the negative captions are drawn on the device, so their rows keep their padding."""
        bs = image_embeds.size(0)
        with torch.no_grad():
            if idx is None:
                same = torch.eye(bs, dtype=torch.bool, device=image_embeds.device)
            else:
                same = torch.eq(idx, idx.t())
            weights_i2t = hard_negative_weights(sim_i2t[:, :bs], same, self.itm_eps)
            weights_t2i = hard_negative_weights(sim_t2i[:, :bs], same, self.itm_eps)
            if noise is None:
                neg_image = sample_negatives(weights_t2i)  # a negative image for each text
                neg_text = sample_negatives(weights_i2t)   # a negative text for each image
            else:
                neg_image, neg_text = (sample_negatives(w, n) for w, n in zip((weights_t2i, weights_i2t), noise))

        # One fusion pass over all 3B pairs (and the extra rows). Every pair's image is one of the B
        # images of the batch, so each fusion layer projects the B images' keys and values once and
        # the rows index them (`encoder_index`), instead of projecting 3B copies in two passes as
        # the original does (and the B images again for the MLM pass). Rows do not interact: the
        # outputs are the original's (with dropout active the random masks are drawn in a
        # different order).
        arange = torch.arange(bs, device=image_embeds.device)
        rows = [text_embeds, text_embeds, text_embeds[neg_text]]
        atts = [text_atts, text_atts, text_atts[neg_text]]
        image_index = [arange, neg_image, arange]
        if extra_rows is not None:
            rows.append(extra_rows)
            atts.append(text_atts)
            image_index.append(arange)
        # image_atts is all ones: no encoder mask attends to every image token just the same, and
        # lets the attention kernel skip the mask
        packing = None
        if host_mask is not None:
            host_rows = [host_mask, host_mask, torch.ones_like(host_mask)] + [host_mask] * (extra_rows is not None)
            packing = Packing(torch.cat(host_rows), image_embeds.device)
        # The ITM head reads each pair's [CLS] alone, the MLM head the extra rows' masked tokens: the
        # last layer computes those outputs only (xbert.BertEncoder). The extra rows without
        # `extra_positions` come back whole.
        length = text_atts.size(1)
        positions = torch.arange(3 * bs, device=image_embeds.device) * length  # the pairs' [CLS]
        if extra_rows is not None:
            positions = None if extra_positions is None else torch.cat([positions, 3 * bs * length + extra_positions])
        states = self._fusion_states(self.text_encoder, torch.cat(rows), torch.cat(atts), image_embeds,
                                     torch.cat(image_index), packing, positions)
        vl_output = self.itm_head(states[:3 * bs] if positions is not None else states[:3 * bs, 0, :])
        # built on the device: 1 for the B positives, 0 for the 2B negatives
        itm_labels = (torch.arange(3 * bs, device=image_embeds.device) < bs).long()
        loss_itm = F.cross_entropy(vl_output, itm_labels)
        return loss_itm if extra_rows is None else (loss_itm, states[3 * bs:])


class ClassifierALBEF(ALBEFBase):
    """A classification head on the multimodal [CLS], trained with momentum distillation
    (VE: one image per text; NLVR2: an image pair per text)."""

    def _image_inputs(self, image_embeds, batch_size):
        """The encoder states and masks the text encoder attends to (one tensor, or a list)."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        return image_embeds, image_atts

    def _predict(self, visual_encoder, text_encoder, cls_head, image, text, batch_size):
        states, atts = self._image_inputs(visual_encoder(image), batch_size)
        output = text_encoder(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=states,
                              encoder_attention_mask=atts, return_dict=True)
        return cls_head(output.last_hidden_state[:, 0, :])

    def forward(self, image, text, targets, alpha=0, train=True, update_momentum=True):
        from .losses import classification_distill_loss
        batch_size = targets.size(0)
        prediction = self._predict(self.visual_encoder, self.text_encoder, self.cls_head, image, text, batch_size)
        if not train:
            return prediction
        prediction_m = None
        if self.distill:
            with torch.no_grad():
                if update_momentum:
                    self._momentum_update()
                prediction_m = self._predict(self.visual_encoder_m, self.text_encoder_m, self.cls_head_m,
                                             image, text, batch_size)
        return classification_distill_loss(prediction, targets, prediction_m, alpha)

    @staticmethod
    def make_cls_head(width, num_classes):
        return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))

    def _build_classifier(self, config, num_classes):
        """`cls_head` over num_classes and, with config['distill'], the momentum encoders."""
        self.distill = config['distill']
        self.cls_head = self.make_cls_head(self.text_encoder.config.hidden_size, num_classes)
        if self.distill:
            self.momentum = 0.995
            self._create_momentum('visual_encoder', 'text_encoder', 'cls_head')
