"""Several adapters resident on one base, chosen per row: each row answers as the LoRA model
of its adapter alone would; adapters of other bases are refused, naming who brought them."""

import mlx.core as mx
import pytest
from helpers import build_tiny_model, trained_lora
from mlx.utils import tree_flatten

from macft.errors import ModelError
from macft.lora.multi import AdapterBank, MultiLoRALinear

X = mx.array([[5, 17, 42, 99, 3], [7, 7, 200, 1, 64], [250, 9, 31, 8, 120]])


def lora_model(seed: int, rank: int, targets: str, dora: bool = False):
    """A LoRA model (non-zero adapters) as chat loads a run: (model, its tensors, scale)."""
    kw = {"rank": rank, "alpha": 2 * rank, "targets": targets, "dora": dora}
    model = trained_lora(seed=seed, spread=0.5, **kw)
    model.eval()  # no LoRA dropout, as chat generates
    return model, dict(tree_flatten(model.trainable_parameters())), 2.0


@pytest.fixture(scope="module")
def adapters():
    return {
        "a": lora_model(1, 4, "all-linear"),
        "b": lora_model(2, 8, "attention"),
        "d": lora_model(3, 4, "all-linear", dora=True),
    }


def test_each_row_answers_as_its_adapter_alone(adapters):
    base = build_tiny_model()
    alone = {"base": base(X)}
    for name, (model, _, _) in adapters.items():
        alone[name] = model(X)
    bank = AdapterBank(build_tiny_model())
    slots = {"base": 0}
    for name, (_, weights, scale) in adapters.items():
        slots[name] = bank.add(name, weights, scale, f"runs/{name}")
    assert sum(isinstance(m, MultiLoRALinear) for _, m in bank.model.named_modules()) == 14
    mixes = [["a", "base", "b"], ["b", "b", "a"], ["a"] * 3, ["base"] * 3, ["d", "a", "base"]]
    for mix in [*mixes, ["d"] * 3, ["b", "d", "d"]]:
        bank.rows.set([slots[n] for n in mix])
        out = bank.model(X)
        for row, name in enumerate(mix):
            assert mx.allclose(out[row], alone[name][row], atol=1e-4), (mix, row)
    bank.rows.set([0, 0, 0])
    assert not mx.allclose(alone["a"], alone["base"], atol=1e-2)  # the adapters matter


def test_removed_adapter_frees_its_slot_for_the_next(adapters):
    bank = AdapterBank(build_tiny_model())
    _, wa, scale = adapters["a"]
    _, wb, _ = adapters["b"]
    assert bank.add("a", wa, scale, "runs/a") == 1
    assert bank.add("b", wb, scale, "runs/b") == 2
    bank.remove("a")
    bank.rows.set([1, 1, 1])  # the freed slot is zeros now: the base
    assert mx.allclose(bank.model(X), build_tiny_model()(X), atol=1e-5)
    assert bank.add("c", wa, scale, "runs/c") == 1
    bank.rows.set([1, 1, 1])
    assert mx.allclose(bank.model(X), adapters["a"][0](X), atol=1e-4)


def test_adapters_of_another_base_are_refused_naming_the_run(adapters):
    bank = AdapterBank(build_tiny_model())
    _, weights, scale = adapters["a"]
    key = next(k for k in weights if k.endswith("lora_a"))
    wrong = {**weights, key: mx.zeros((32, 4))}
    with pytest.raises(ModelError, match=r"runs/other.*another base"):
        bank.add("other", wrong, scale, "runs/other")
    with pytest.raises(ModelError, match=r"runs/odd.*not a linear layer"):
        bank.add(
            "odd",
            {"model.nowhere.lora_a": mx.zeros((64, 4)), "model.nowhere.lora_b": mx.zeros((4, 64))},
            scale,
            "runs/odd",
        )
    with pytest.raises(ModelError, match=r"runs/moe.*mixture-of-experts"):
        bank.add("moe", {**weights, key: mx.zeros((4, 4, 64))}, scale, "runs/moe")
    with pytest.raises(ModelError, match=r"runs/dora.*another base"):
        bank.add(
            "dora", {**weights, key.replace("lora_a", "m"): mx.ones((32,))}, scale, "runs/dora"
        )
    assert set(bank.check(weights, "runs/a")) == {k.rpartition(".")[0] for k in weights}
    assert bank.slots == {}  # all or nothing, and check alone loads nothing: no layer touched
    assert not any(isinstance(m, MultiLoRALinear) for _, m in bank.model.named_modules())
