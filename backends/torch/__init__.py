"""DualOpt for PyTorch: a drop-in :class:`torch.optim.Optimizer`.

``DualOpt`` applies the DualOpt rule (``spec/SPEC.md``): a direction (Adam or
SGD with momentum) gives the pre-weight, then a layer-wise *pull* moves it
towards an anchor — the pretrained weights for ``paradigm="finetune"`` (weight
rollback), zero for ``paradigm="scratch"`` (real-time layer-wise decay), nothing
for ``paradigm="none"`` (plain Adam / SGD). Swap it in for ``torch.optim.AdamW``
in any training loop, Lightning module or Trainer.

Fine-tuning a pretrained backbone with a new head, in one line (load the
pretrained weights *before* creating the optimizer: finetune anchors are a
snapshot of the weights at construction):

>>> import torch
>>> from collections import OrderedDict
>>> from dualopt.torch import DualOpt
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(OrderedDict(
...     backbone=torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16)),
...     head=torch.nn.Linear(16, 3)))
>>> # model.backbone.load_state_dict(pretrained)   # first load the pretrained weights
>>> opt = DualOpt.for_finetuning(model, head="head", lr=1e-3, layer_index="module")
>>> [(g["paradigm"], len(g["params"])) for g in opt.param_groups]
[('finetune', 4), ('scratch', 2)]
>>> x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
>>> for _ in range(3):
...     opt.zero_grad()
...     torch.nn.functional.cross_entropy(model(x), y).backward()
...     opt.step()
>>> int(opt.state[model.backbone[0].weight]["step"])
3

The backbone's two Linear layers are finetune layers 0 and 1 (``layer_index="module"``
keys weight and bias of one module together): layer 0 is pulled back hardest
(``rollback_max``, default ``0.01 / lr``), the last one not at all
(``rollback_min = 0``). The head is trained from scratch with real-time
layer-wise decay ``weight_decay * (l + 1) / L``.
"""


from ._optimizer import DualOpt, STATE_FORMAT, is_no_pull, no_pull_param_groups, peft_param_groups

__all__ = ['DualOpt', 'STATE_FORMAT', 'is_no_pull', 'no_pull_param_groups', 'peft_param_groups']
