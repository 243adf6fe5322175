"""DualOpt inside Hugging Face's ``Trainer``: both optimizer routes, warmup from 0, no pull for
biases and norms, and a checkpoint resume that continues bit for bit (anchors included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dualopt.torch._integrations import is_no_pull, no_pull_param_groups  # noqa: E402
from dualopt.torch import DualOpt  # noqa: E402

STEPS, SAVE_AT, WARMUP = 12, 6, 3


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT backbone saved to disk: the classifier head is new when a classification model loads it."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    path = tmp_path_factory.mktemp("bert")
    transformers.BertModel(cfg).save_pretrained(path)
    return path


def _data() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 64, (8,), generator=g), "labels": torch.tensor(i % 3)} for i in range(48)]


def _trainer(pretrained: Path, out: Path, route: str) -> Any:
    model = transformers.BertForSequenceClassification.from_pretrained(pretrained, num_labels=3)
    groups = no_pull_param_groups(model, head="classifier", head_lr=1e-2)
    args = transformers.TrainingArguments(
        str(out), per_device_train_batch_size=8, max_steps=STEPS, save_steps=SAVE_AT, report_to=[], use_cpu=True,
        seed=0, logging_steps=1000, disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=WARMUP)
    if route == "optimizers":
        opt = DualOpt(groups, lr=1e-3, layer_index="module")
        sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=WARMUP, num_training_steps=STEPS)
        return transformers.Trainer(model=model, args=args, train_dataset=_data(), optimizers=(opt, sched))
    kwargs = {"params": groups, "lr": 1e-3, "layer_index": "module"}
    return transformers.Trainer(model=model, args=args, train_dataset=_data(),
                                optimizer_cls_and_kwargs=(DualOpt, kwargs))


def _dualopt(trainer: Any) -> DualOpt:
    opt = trainer.optimizer
    return opt.optimizer if not isinstance(opt, DualOpt) else opt  # accelerate wraps it


@pytest.mark.parametrize("route", ["optimizers", "optimizer_cls_and_kwargs"])
def test_trainer_resume_is_bitwise_and_keeps_the_pretrained_anchors(pretrained, tmp_path, route, one_torch_thread):
    loaded = transformers.BertForSequenceClassification.from_pretrained(pretrained, num_labels=3)
    before = {n: p.detach().clone() for n, p in loaded.named_parameters()}

    whole = _trainer(pretrained, tmp_path / "whole", route)
    whole.train()
    opt = _dualopt(whole)
    assert isinstance(opt, DualOpt)
    # warmup from 0 with the default rollback_max: kappa_max = 0.01 / base lr, the schedule's end is lr 0
    assert [g["rollback_max"] for g in opt.param_groups if g["paradigm"] == "finetune"] == [0.01 / 1e-3]
    assert [g["lr"] for g in opt.param_groups] == [0.0] * len(opt.param_groups)
    names = dict(whole.model.named_parameters())
    for group in opt.param_groups:
        for name, p in zip(group["param_names"], group["params"]):
            assert opt.state[p]["step"] == STEPS, name
            if group["paradigm"] == "finetune":
                torch.testing.assert_close(opt.state[p]["anchor"], before[name], rtol=0, atol=0)
    assert {g["paradigm"] for g in opt.param_groups} == {"finetune", "none", "scratch"}
    assert not torch.equal(names["classifier.weight"], before["classifier.weight"])

    resumed = _trainer(pretrained, tmp_path / "resumed", route)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / f"checkpoint-{SAVE_AT}"))
    ropt = _dualopt(resumed)
    for (name, p), (_, q) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    # the anchors came back from optimizer.pt, still the pretrained weights (not the checkpoint's weights)
    for group in ropt.param_groups:
        for name, p in zip(group["param_names"], group["params"]):
            if group["paradigm"] == "finetune":
                torch.testing.assert_close(ropt.state[p]["anchor"], before[name], rtol=0, atol=0)
            for key, value in opt.state[names[name]].items():
                other = ropt.state[p][key]
                assert torch.equal(torch.as_tensor(other), torch.as_tensor(value)), (name, key)


def test_no_pull_groups_follow_the_trainers_no_decay_convention(pretrained, tmp_path):
    trainer = _trainer(pretrained, tmp_path, "optimizers")
    model = trainer.model
    decay = set(trainer.get_decay_parameter_names(model))
    groups = no_pull_param_groups(model, head="classifier")
    by_paradigm: dict[str, set[str]] = {}
    for g in groups:
        by_paradigm.setdefault(g["paradigm"], set()).update(n for n, _ in g["params"])
    everything = {n for n, _ in model.named_parameters()}
    assert by_paradigm["none"] == everything - decay
    assert by_paradigm["scratch"] == {"classifier.weight"}
    assert by_paradigm["finetune"] == decay - {"classifier.weight"}
    rates = DualOpt(groups, lr=1e-3).layer_rates()
    assert all(rates[n] == 0.0 for n in by_paradigm["none"])
    assert rates["bert.embeddings.word_embeddings.weight"] == 10.0  # the shallowest finetune tensor: kappa_max


def test_no_pull_rule_and_head_errors():
    ln, lin = torch.nn.LayerNorm(4), torch.nn.Linear(4, 4)
    assert is_no_pull("ln.weight", ln.weight, ln) and is_no_pull("x.bias", lin.bias, lin)
    assert is_no_pull("model.final_norm.weight", lin.weight, lin)
    assert not is_no_pull("encoder.dense.weight", lin.weight, lin)
    assert not is_no_pull("normalizer.weight", lin.weight, lin)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="head"):
        no_pull_param_groups(net, head="classifier")
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        no_pull_param_groups(net)
    net[1].weight.requires_grad_(True)
    groups = no_pull_param_groups(net, head="1", head_lr=0.5, head_weight_decay=0.2, no_pull=lambda *a: False)
    assert [(g["paradigm"], [n for n, _ in g["params"]], g.get("lr"), g.get("weight_decay")) for g in groups] == [
        ("scratch", ["1.weight"], 0.5, 0.2)]
