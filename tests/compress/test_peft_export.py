"""An exported adapter is loaded by the real `peft` library and reproduces the original update."""

import numpy as np
import pytest

from jsubspace.compress import export_model
from jsubspace.compress import fit_store

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def _deltas(model):
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            out[key] = module.get_delta_weight("default").detach().numpy().astype(np.float64)
    return out


def test_exported_adapter_loads_in_peft_and_matches_at_full_k(tmp_path, tiny_torch_model):
    originals = []
    for seed in range(3):
        torch.manual_seed(seed)
        config = peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        model = peft.get_peft_model(tiny_torch_model(), config)
        model.save_pretrained(str(tmp_path / "pop" / f"adapter{seed}"))
        originals.append(_deltas(model))
    # 3 adapters of rank 2 span 6 directions per side: k = 6 keeps everything.
    store = fit_store(str(tmp_path / "pop"), str(tmp_path / "store"), k=6)
    path = export_model(store, "adapter1", str(tmp_path / "out"))
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(tiny_torch_model(), path)
    got = _deltas(loaded)
    assert set(got) == set(originals[1])
    for name, delta in originals[1].items():
        np.testing.assert_allclose(got[name], delta, atol=1e-5 * np.abs(delta).max() + 1e-7)
    # A smaller basis gives a valid adapter too, with the error the store predicts.
    small = fit_store(str(tmp_path / "pop"), str(tmp_path / "small"), k=2)
    path = export_model(small, "adapter0", str(tmp_path / "out_small"), rank=2)
    loaded = peft.PeftModel.from_pretrained(tiny_torch_model(), path)
    for name, delta in _deltas(loaded).items():
        want = small.reconstruct("adapter0", name).astype(np.float64)
        np.testing.assert_allclose(delta, want, atol=1e-5 * np.abs(want).max() + 1e-7)
