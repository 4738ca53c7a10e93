"""Shapes shared by the benchmark scripts (no flags here, so any script may import it)."""


def lora_modules(layers: int, hidden: int = 4096, kv: int = 1024) -> dict[str, tuple[int, int]]:
    """Mistral-7B attention projections adapted by LoRA: module name -> (out, in)."""
    shapes = {}
    for i in range(layers):
        for proj, out in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"model.layers.{i}.self_attn.{proj}"] = (out, hidden)
    return shapes
