"""DualOpt on a PEFT LoRA model: adapters ``scratch`` (toward 0, i.e. the merged weight toward the pretrained
one), DoRA magnitudes ``finetune``, a new ``modules_to_save`` head ``scratch``, the frozen base untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from dualopt.torch._integrations import peft_param_groups  # noqa: E402
from dualopt.torch import DualOpt  # noqa: E402


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    path = tmp_path_factory.mktemp("bert")
    transformers.BertModel(cfg).save_pretrained(path)
    return path


def _lora(pretrained: Path, **kwargs: Any) -> Any:
    torch.manual_seed(1)
    base = transformers.BertForSequenceClassification.from_pretrained(pretrained, num_labels=3)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], **kwargs)
    return peft.get_peft_model(base, config)


def _train(model: Any, opt: DualOpt, steps: int) -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 64, (16, 8), generator=g), torch.arange(16) % 3
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=x, labels=y).loss.backward()
        opt.step()


def test_lora_adapters_train_frozen_base_untouched(pretrained, one_torch_thread):
    model = _lora(pretrained)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = peft_param_groups(model, head="classifier", adapter_weight_decay=0.1, head_lr=1e-2)
    assert [g["paradigm"] for g in groups] == ["scratch", "scratch", "none"]
    adapters = [n for n, _ in groups[0]["params"]]
    assert len(adapters) == 8 and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert groups[0]["weight_decay"] == 0.1 and "lr" not in groups[0]
    head = [n for n, _ in groups[1]["params"]]
    assert head == ["base_model.model.classifier.modules_to_save.default.weight"] and groups[1]["lr"] == 1e-2
    assert [n for n, _ in groups[2]["params"]] == ["base_model.model.classifier.modules_to_save.default.bias"]

    opt = DualOpt(groups, lr=1e-2)
    _train(model, opt, 10)
    trainable = {n for g in opt.param_groups for n in g["param_names"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert name in trainable
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert name not in trainable
            torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=name)
    assert sum(not p.requires_grad for p in model.parameters()) > 30
    # scratch layers are numbered across groups: the 8 adapter tensors, then the head's weight (L = 9)
    rates = opt.layer_rates()
    assert [rates[n] for n in adapters] == pytest.approx([0.1 * (i + 1) / 9 for i in range(8)], rel=1e-15)
    assert rates[head[0]] == pytest.approx(1e-2, rel=1e-15)
    assert all("anchor" not in opt.state[p] for g in opt.param_groups for p in g["params"])


def test_lora_merged_weight_is_pulled_back_toward_the_pretrained_weight(pretrained, one_torch_thread):
    """With a zero gradient, scratch pulls A and B toward 0, so W0 + s*B@A moves toward W0."""
    model = _lora(pretrained)
    groups = peft_param_groups(model)
    opt = DualOpt(groups, lr=1e-2, weight_decay=5.0)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta0 = (b @ a).detach().clone()
    for _ in range(5):
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
    # a zero Adam direction leaves the pre-weight equal to the weight; each step scales A and B by (1 - lr*rho)
    rates = opt.layer_rates()
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query"
    rate_a, rate_b = rates[f"{prefix}.lora_A.default.weight"], rates[f"{prefix}.lora_B.default.weight"]
    shrink = ((1 - 1e-2 * rate_a) * (1 - 1e-2 * rate_b)) ** 5
    assert 0 < shrink < 0.95
    torch.testing.assert_close(b @ a, delta0 * shrink, rtol=1e-5, atol=1e-6)


def test_dora_magnitude_is_anchored_at_its_initial_value(pretrained, one_torch_thread):
    model = _lora(pretrained, use_dora=True)
    groups = peft_param_groups(model, head="classifier")
    finetune = [g for g in groups if g["paradigm"] == "finetune"]
    assert len(finetune) == 1
    assert all(".lora_magnitude_vector." in n for n, _ in finetune[0]["params"])
    start = {n: p.detach().clone() for n, p in finetune[0]["params"]}
    opt = DualOpt(groups, lr=1e-2)
    _train(model, opt, 3)
    group = next(g for g in opt.param_groups if g["paradigm"] == "finetune")
    for name, p in zip(group["param_names"], group["params"]):
        torch.testing.assert_close(opt.state[p]["anchor"], start[name], rtol=0, atol=0)
        assert not torch.equal(p, start[name])


def test_a_model_without_adapters_is_refused():
    with pytest.raises(ValueError, match="PEFT"):
        peft_param_groups(torch.nn.Linear(3, 3))


def test_lora_under_trainer_resumes_bitwise_and_leaves_the_base_alone(pretrained, tmp_path, one_torch_thread):
    """A Trainer checkpoint of a PEFT model holds only the adapter and the head; the resume is still exact."""
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(0, 64, (8,), generator=g), "labels": torch.tensor(i % 3)} for i in range(48)]

    def trainer(out: str) -> Any:
        model = _lora(pretrained)
        args = transformers.TrainingArguments(
            str(tmp_path / out), per_device_train_batch_size=8, max_steps=12, save_steps=6, report_to=[],
            use_cpu=True, seed=0, disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=3)
        kwargs = {"params": peft_param_groups(model, head="classifier"), "lr": 1e-2}
        return transformers.Trainer(model=model, args=args, train_dataset=data,
                                    optimizer_cls_and_kwargs=(DualOpt, kwargs))

    whole = trainer("whole")
    start = {n: p.detach().clone() for n, p in whole.model.named_parameters()}
    frozen = {n for n, p in whole.model.named_parameters() if not p.requires_grad}
    whole.train()
    resumed = trainer("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-6"))
    assert len(frozen) > 30
    for (name, p), (_, q) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
        if name in frozen:
            torch.testing.assert_close(p, start[name], rtol=0, atol=0, msg=name)
        else:
            assert not torch.equal(p, start[name]), f"{name} did not train"
