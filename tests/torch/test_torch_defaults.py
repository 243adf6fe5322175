"""Issue 18 in the torch adapter: the issue's table, for_finetuning(no_pull=...), for_peft, the exports and
the weight_decay=0 warning. Each test fails on the code before issue 18 (noted per test)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from decoupled_core import HyperparameterError, WeightDecayWarning  # noqa: E402
from dualopt.torch import DualOpt  # noqa: E402


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))


def test_issue_table():
    """The reference column of the issue's table (unchanged behaviour; the other adapters now match it)."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    rates = DualOpt(net.named_parameters(), lr=1e-3, paradigm="finetune", rollback_max=10.0).layer_rates()
    assert list(rates.values()) == [10.0, 6.666666666666668, 3.333333333333334, 0.0]


def test_integrations_are_exported_from_dualopt_torch():
    """Old code: ImportError (they lived only in dualopt.torch._integrations)."""
    from dualopt.torch import _integrations as integ
    from dualopt.torch import is_no_pull, no_pull_param_groups, peft_param_groups

    assert (is_no_pull, no_pull_param_groups, peft_param_groups) == (
        integ.is_no_pull, integ.no_pull_param_groups, integ.peft_param_groups)


def test_for_finetuning_no_pull_gives_biases_and_norms_no_pull():
    """Old code: TypeError (no no_pull argument)."""
    opt = DualOpt.for_finetuning(_mlp(), head="2", lr=1e-2, no_pull=True)
    groups = [(g["paradigm"], g["param_names"]) for g in opt.param_groups]
    assert groups == [("finetune", ["0.weight"]), ("none", ["0.bias", "1.weight", "1.bias"]),
                      ("scratch", ["2.weight"]), ("none", ["2.bias"])]
    rates = opt.layer_rates()
    assert rates["0.weight"] == 1.0 and rates["0.bias"] == rates["1.weight"] == 0.0  # L = 1 finetune layer
    custom = DualOpt.for_finetuning(_mlp(), no_pull=lambda name, p, m: name.endswith("bias"))
    assert [(g["paradigm"], g["param_names"]) for g in custom.param_groups] == [
        ("finetune", ["0.weight", "1.weight", "2.weight"]), ("none", ["0.bias", "1.bias", "2.bias"])]
    with pytest.raises(HyperparameterError, match="no_pull"):
        DualOpt.for_finetuning(_mlp(), no_pull="bias")


class _LoraLinear(torch.nn.Module):
    """The shape of a PEFT tuner layer: a frozen base and adapter weights named by adapter_layer_names."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(3, 3)
        self.base.requires_grad_(False)
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(3, 1, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(1, 3, bias=False)})


def test_for_peft_builds_peft_groups_and_passes_the_rest_to_the_constructor():
    """Old code: AttributeError (no DualOpt.for_peft)."""
    model = torch.nn.Sequential(_LoraLinear(), torch.nn.Linear(3, 2))
    opt = DualOpt.for_peft(model, head="1", lr=2e-3, adapter_weight_decay=0.5, head_paradigm="scratch",
                           betas=(0.8, 0.99))
    got = [(g["paradigm"], g["param_names"], g["weight_decay"], g["betas"], g["lr"]) for g in opt.param_groups]
    assert got == [("scratch", ["0.lora_A.default.weight", "0.lora_B.default.weight"], 0.5, (0.8, 0.99), 2e-3),
                   ("scratch", ["1.weight"], 1e-2, (0.8, 0.99), 2e-3), ("none", ["1.bias"], 1e-2, (0.8, 0.99), 2e-3)]
    with pytest.raises(HyperparameterError, match="paradigm"):
        DualOpt.for_peft(model, paradigm="finetune")


def test_zero_weight_decay_on_a_finetune_group_warns():
    """Old code: no warning (weight_decay=0 silently changed nothing for finetune tensors)."""
    with pytest.warns(WeightDecayWarning, match="finetune param group 0.*rollback_max"):
        DualOpt(_mlp().parameters(), paradigm="finetune", weight_decay=0.0)
    net = _mlp()
    with pytest.warns(WeightDecayWarning, match="group 0"):  # a group's own 0, even beside a scratch group
        DualOpt([{"params": net[0].parameters(), "weight_decay": 0.0},
                 {"params": net[2].parameters(), "paradigm": "scratch"}], paradigm="finetune")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the optimizer-wide 0 is the scratch head's lambda here: no warning
        DualOpt.for_finetuning(_mlp(), head="2", weight_decay=0.0)
        opt = DualOpt(_mlp().parameters(), paradigm="finetune")
    with pytest.warns(WeightDecayWarning, match="group 1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.0})
