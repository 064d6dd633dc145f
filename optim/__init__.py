"""AdamW with the original parameter grouping (docs/DESIGN.md, "Optimizer").

Parameters with one dimension or a name ending in '.bias' get no weight decay; everything else,
including the 0-d `temp`, `pos_embed` and `cls_token`, does. Parameters that are not trained
(requires_grad False: the momentum encoders, and a frozen tower, models/freeze.py) are left out.
"""
import torch


def _get(args, key, default=None):
    return args.get(key, default) if isinstance(args, dict) else getattr(args, key, default)


def param_groups(model, weight_decay, skip_list=()):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith('.bias') or name in skip_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{'params': no_decay, 'weight_decay': 0.0}, {'params': decay, 'weight_decay': weight_decay}]


def create_optimizer(args, model):
    """`args` is the config's `optimizer` section: {opt: adamW, lr, weight_decay}."""
    opt = str(_get(args, 'opt')).lower()
    if opt != 'adamw':
        raise ValueError(f"optimizer.opt: only 'adamW' is supported, got {_get(args, 'opt')!r}")
    weight_decay = _get(args, 'weight_decay', 0.0)
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else ()
    if weight_decay:
        parameters = param_groups(model, weight_decay, skip)
    else:
        parameters = [{'params': [p for p in model.parameters() if p.requires_grad], 'weight_decay': 0.0}]
    fused = _get(args, 'fused', None)
    if fused is None:  # the fused kernel where torch has one: one pass over all parameters, not a loop
        fused = all(p.device.type in ('cpu', 'cuda') and p.is_floating_point()
                    for group in parameters for p in group['params'])
    return torch.optim.AdamW(parameters, lr=_get(args, 'lr'), betas=(0.9, 0.999), eps=1e-8, fused=fused)
