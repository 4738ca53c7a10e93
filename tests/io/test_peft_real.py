"""Adapters written by the real `peft` library: our factored layers equal PEFT's own updates."""

import numpy as np
import pytest

from jsubspace import io
from jsubspace import sharding

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("rslora", [False, True])
def test_real_peft_adapters(tmp_path, rslora, tiny_torch_model):
    deltas = []
    for seed in range(3):
        torch.manual_seed(seed)
        config = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
            use_rslora=rslora,
            rank_pattern={"down_proj": 2},
            alpha_pattern={"layers.1.q_proj": 32},
        )
        model = peft.get_peft_model(tiny_torch_model(), config)
        model.save_pretrained(str(tmp_path / f"adapter{seed}"))
        found = {}
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                key = name.removeprefix("base_model.model.")
                found[key] = module.get_delta_weight("default").detach().numpy().astype(np.float64)
        deltas.append(found)
    pop = io.open_population(str(tmp_path))
    assert pop.is_lora and len(pop.layers) == 6
    mesh = sharding.models_mesh(2)
    by_name = {layer.name: layer for layer in pop.layers}
    assert by_name["layers.0.down_proj"].rank == 2 and by_name["layers.0.q_proj"].rank == 4
    for name, layer in by_name.items():
        placed = io.place_layer(layer, mesh)
        a, b, s = (np.asarray(t, np.float64) for t in (placed.a, placed.b, placed.scales))
        for i in range(3):
            np.testing.assert_allclose(s[i] * b[i] @ a[i], deltas[i][name], rtol=1e-5, atol=1e-6)
