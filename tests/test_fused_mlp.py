"""`fused_mlp`: the block stack through `kernels.linear_gelu` instead of the HF MLP module.

On the CPU `linear_gelu` runs its fallback, `F.gelu(F.linear(...))`: the same ops as the HF MLP, so the
stack must give bit-identical output; that checks the wiring (which weights, which input, where the down
projection goes). The kernel itself is checked in test_linear_gelu.py and on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from dinov3_packing.kernels.linear_gelu import linear_gelu
from dinov3_packing.modeling import DINOv3ViTPackingModel
from dinov3_packing.packing import PackedLayout


def test_stack_with_fused_mlp_equals_the_module_path(tiny, monkeypatch):
    from dinov3_packing import modeling

    calls = []

    def counting_linear_gelu(x, weight, bias):
        calls.append(weight.shape)
        return linear_gelu(x, weight, bias)

    monkeypatch.setattr(modeling, "linear_gelu", counting_linear_gelu)
    torch.manual_seed(0)
    model = DINOv3ViTPackingModel(tiny(num_hidden_layers=3)).eval()
    layout = PackedLayout.build([(1, 2, 3), (1, 1, 1), (1, 4, 2)], model.num_prefix_tokens, "cpu")
    x = torch.randn(layout.num_tokens, model.config.hidden_size)
    cos, sin = model.rope_embeddings(layout, torch.float32)
    with torch.no_grad():
        plain, _ = model.model(x, cos, sin, layout, "sdpa", fused_mlp=False)
        assert calls == []
        fused, _ = model.model(x, cos, sin, layout, "sdpa", fused_mlp=True)
    # One fused call per block, on the up-projection's weight.
    up = (model.config.intermediate_size, model.config.hidden_size)
    assert calls == [up] * 3
    assert torch.equal(fused, plain)


def test_model_runs_with_fused_mlp_set_on_cpu(tiny):
    # On the CPU the fused kernel does not apply; the flag must not change the result or fail.
    torch.manual_seed(0)
    model = DINOv3ViTPackingModel(tiny(), fused_mlp=True).eval()
    grid = torch.tensor([[1, 2, 2], [1, 1, 3]])
    hs = torch.randn(7, model.patch_dim)
    with torch.no_grad():
        a = model(hs, grid).last_hidden_state
        model.fused_mlp = False
        b = model(hs, grid).last_hidden_state
    assert torch.equal(a, b)


@pytest.mark.parametrize(("overrides", "match"), [({"use_gated_mlp": True}, "gated"), ({"hidden_act": "silu"}, "silu")])
def test_fused_mlp_refuses_other_mlps(tiny, overrides, match):
    with pytest.raises(ValueError, match=f"fused_mlp: .*{match}"):
        DINOv3ViTPackingModel(tiny(**overrides), fused_mlp=True)
    model = DINOv3ViTPackingModel(tiny(**overrides))
    with pytest.raises(ValueError, match=f"fused_mlp: .*{match}"):
        model.fused_mlp = True
    assert model.fused_mlp is False


def test_fused_mlp_must_be_a_bool(tiny):
    with pytest.raises(TypeError, match="fused_mlp: expected a bool or None"):
        DINOv3ViTPackingModel(tiny(), fused_mlp="no")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [({}, True), ({"use_gated_mlp": True}, False), ({"hidden_act": "silu"}, False)],
)
def test_fused_mlp_defaults_to_where_the_kernel_applies(tiny, overrides, expected):
    model = DINOv3ViTPackingModel(tiny(**overrides))
    assert model.fused_mlp is expected
    model.fused_mlp = False
    assert model.fused_mlp is False
    model.fused_mlp = None  # back to auto
    assert model.fused_mlp is expected
