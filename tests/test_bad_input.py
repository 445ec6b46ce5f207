"""Every malformed call raises ValueError/TypeError naming the argument, before any compute.

"Before compute" is checked with a forward pre-hook on the patch embedding: it must never run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from dinov3_packing import DINOv3ViTPackingModel, load_packing_model, pack, patchify, random_packing_model
from dinov3_packing.apps.align import align
from dinov3_packing.compat.seed import DINOv3ViTPacking
from dinov3_packing.data.files import sample_image_paths

PATCH_DIM = 16 * 16 * 3


@pytest.fixture(scope="module")
def model():
    m = random_packing_model(tiny_config(), seed=0).eval()
    m.embed_calls = 0

    def count(*_):
        m.embed_calls += 1

    m.embeddings.register_forward_pre_hook(count)
    return m


def _rejects(model, exc, match, *args, **kwargs):
    before = model.embed_calls
    with pytest.raises(exc, match=match), torch.no_grad():
        model(*args, **kwargs)
    assert model.embed_calls == before, "the model computed before rejecting its input"


def test_valid_input_runs(model):
    """The hook counts real forwards (so the 'before compute' checks below can fail)."""
    before = model.embed_calls
    with torch.no_grad():
        out = model(torch.randn(6, PATCH_DIM), torch.tensor([[1, 2, 3]]))
    assert out.last_hidden_state.shape == (6, 32)
    assert model.embed_calls == before + 1


def test_patch14_layout_for_patch16_model(model):
    rows = torch.randn(4, 14 * 14 * 3)  # 588: DINOv2's patch 14
    _rejects(model, ValueError, r"hidden_states.*patch_dim 768.*got 588", rows, torch.tensor([[1, 2, 2]]))


@pytest.mark.parametrize("rows", [5, 7, 0])
def test_row_count_not_sum_thw(model, rows):
    grid = torch.tensor([[1, 2, 2], [2, 1, 1]])  # 6 rows
    _rejects(model, ValueError, r"hidden_states.*sum\(t\*h\*w\) = 6", torch.randn(rows, PATCH_DIM), grid)


@pytest.mark.parametrize(
    ("grid", "exc"),
    [
        (torch.tensor([[1.0, 2.0, 2.0]]), TypeError),
        (torch.tensor([[True, True, True]]), TypeError),
        (torch.tensor([[1, 4]]), ValueError),
        (torch.tensor([1, 2, 2]), ValueError),
        (torch.tensor([[[1, 2, 2]]]), ValueError),
        (torch.tensor([[1, 0, 4]]), ValueError),
        (torch.tensor([[0, 2, 2]]), ValueError),
        (torch.tensor([[1, -2, -2]]), ValueError),
        (torch.zeros(0, 3, dtype=torch.long), ValueError),
        ([], ValueError),
        ([[1, 2.0, 2]], TypeError),
        ([[1, 2]], TypeError),
        ("1,2,2", TypeError),
        (None, TypeError),
        (np.array([[1, 2, 2]]), TypeError),
    ],
    ids=[
        "float",
        "bool",
        "N-by-2",
        "1-D",
        "3-D",
        "zero-h",
        "zero-t",
        "negative",
        "empty-tensor",
        "empty-list",
        "list-float",
        "list-short-row",
        "string",
        "none",
        "numpy",
    ],
)
def test_bad_grid_thw(model, grid, exc):
    _rejects(model, exc, "grid_thw", torch.randn(4, PATCH_DIM), grid)


@pytest.mark.parametrize(
    ("hidden_states", "exc"),
    [
        (np.zeros((4, PATCH_DIM), dtype=np.float32), TypeError),
        ([[0.0] * PATCH_DIM] * 4, TypeError),
        (torch.zeros(4, PATCH_DIM, dtype=torch.long), TypeError),
        (torch.zeros(4, PATCH_DIM, dtype=torch.uint8), TypeError),
        (torch.zeros(1, 4, PATCH_DIM), ValueError),
        (torch.zeros(4 * PATCH_DIM), ValueError),
    ],
    ids=["numpy", "list", "int64", "uint8", "3-D", "1-D"],
)
def test_bad_hidden_states(model, hidden_states, exc):
    _rejects(model, exc, "hidden_states", hidden_states, torch.tensor([[1, 2, 2]]))


@pytest.mark.parametrize(("layer", "exc"), [(3, ValueError), (-4, ValueError), (True, TypeError), (1.0, TypeError)])
def test_select_layer_out_of_range(model, layer, exc):
    # 2 layers -> 3 hidden states: valid indices are -3..2.
    _rejects(model, exc, "select_layer", torch.randn(4, PATCH_DIM), torch.tensor([[1, 2, 2]]), select_layer=layer)


@pytest.mark.parametrize(
    ("mask", "exc"),
    [
        (torch.zeros(3, dtype=torch.bool), ValueError),
        (torch.zeros(1, 4, dtype=torch.bool), ValueError),
        (torch.zeros(4, dtype=torch.long), TypeError),
        (torch.zeros(4), TypeError),
        ([False] * 4, TypeError),
    ],
    ids=["short", "2-D", "int64", "float", "list"],
)
def test_bad_bool_masked_pos(model, mask, exc):
    _rejects(model, exc, "bool_masked_pos", torch.randn(4, PATCH_DIM), torch.tensor([[1, 2, 2]]), mask)


@pytest.mark.parametrize("argument", ["hidden_states", "grid_thw", "bool_masked_pos"])
def test_meta_tensor_inputs(model, argument):
    """A meta tensor has a shape but no values: refused naming the argument (torch's NotImplementedError
    named none)."""
    args = {
        "hidden_states": torch.randn(4, PATCH_DIM),
        "grid_thw": torch.tensor([[1, 2, 2]]),
        "bool_masked_pos": torch.zeros(4, dtype=torch.bool),
    }
    args[argument] = args[argument].to("meta")
    _rejects(model, ValueError, rf"^{argument}: got a meta tensor", **args)


def _devices():
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("model_device", _devices())
def test_inputs_on_any_real_device_are_moved(model_device):
    """The rule of `validate_packed_input`: each input may sit on any real device; the result equals the
    one with every input on the model's device (on a CPU-only machine every combination is cpu, so this
    checks the equality itself; with CUDA, all 8 placements of the three inputs are run)."""
    m = random_packing_model(tiny_config(), seed=1).eval().to(model_device)
    g = torch.Generator().manual_seed(0)
    hidden, grid = torch.randn(10, PATCH_DIM, generator=g), torch.tensor([[1, 2, 3], [1, 2, 2]])
    mask = torch.rand(10, generator=g) < 0.3
    with torch.no_grad():
        want = m(hidden.to(model_device), grid.to(model_device), mask.to(model_device)).last_hidden_state
        for dh in _devices():
            for dg in _devices():
                for dm in _devices():
                    got = m(hidden.to(dh), grid.to(dg), mask.to(dm)).last_hidden_state
                    assert got.device == want.device
                    assert torch.equal(got, want), (dh, dg, dm)


def test_attn_backend_unknown():
    with pytest.raises(ValueError, match="attn_backend"):
        DINOv3ViTPackingModel(tiny_config(), attn_backend="xformers")
    with pytest.raises(ValueError, match="attn_backend"):
        load_packing_model("random:vits16", attn_backend="eager")


@pytest.mark.parametrize("backend", ["varlen", "flash_attn"])
def test_attn_backend_needing_cuda_on_cpu(backend):
    m = random_packing_model(tiny_config(), seed=0, attn_backend=backend).eval()
    calls = []
    m.embeddings.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=f"attn_backend.*{backend}.*sdpa"), torch.no_grad():
        m(torch.randn(4, PATCH_DIM), torch.tensor([[1, 2, 2]]))
    assert not calls


@pytest.mark.parametrize(
    "ckpt",
    ["random:vit99", "random:", "random:vits16@", "random:vits16@x", "random:@3", "random:ViTS16", "random:vits16@-1"],
)
def test_bad_random_ckpt(ckpt):
    with pytest.raises(ValueError, match=r"ckpt.*random:<arch>\[@seed\].*vits16"):
        load_packing_model(ckpt)


@pytest.mark.parametrize("ckpt", ["/nonexistent/dinov3", "./missing/weights.safetensors", "~/no-such-dinov3-dir"])
def test_nonexistent_path(ckpt):
    with pytest.raises(ValueError, match="ckpt"):
        load_packing_model(ckpt)


def test_nonexistent_path_in_tmp(tmp_path):
    with pytest.raises(ValueError, match="ckpt"):
        load_packing_model(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="ckpt"):
        load_packing_model(str(tmp_path / "empty-folder-that-is-missing" / "x"))


def test_file_that_is_not_a_dinov3_checkpoint(tmp_path):
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"ckpt.*\.safetensors"):
        load_packing_model(str(other))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(ValueError, match=r"ckpt.*not a DINOv3 ViT state dict"):
        load_packing_model(str(foreign))
    unknown = tmp_path / "unknown.safetensors"
    state = {k: v.contiguous() for k, v in random_packing_model(tiny_config(), seed=0).state_dict().items()}
    save_file(state, str(unknown))  # width 32: no released architecture, and no config.json beside it
    with pytest.raises(ValueError, match=r"ckpt.*config\.json"):
        load_packing_model(str(unknown))


def test_ckpt_and_dtype_types():
    with pytest.raises(TypeError, match="ckpt"):
        load_packing_model(None)
    with pytest.raises(TypeError, match="dtype"):
        load_packing_model("random:vits16", dtype="float32")


def test_wrapper_bad_device():
    with pytest.raises(ValueError, match="device"):
        DINOv3ViTPacking("random:vits16", device="gpu0")
    with pytest.raises(ValueError, match="device"):
        load_packing_model("random:vits16", device="gpu0")


def test_cli_bad_device_is_one_line_not_a_traceback(capsys):
    from dinov3_packing.cli import main

    argv = ["pca", str(sample_image_paths()[0]), "--ckpt", "random:vits16", "--device", "gpu0", "--out", "unused.png"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(("error: --device:", "error: device:")) and "Traceback" not in err


def test_pack_and_patchify_bad_input():
    with pytest.raises(TypeError, match="images"):
        pack(torch.zeros(2, 3, 16, 16), 16)
    with pytest.raises(TypeError, match="images"):
        pack([], 16)
    with pytest.raises(TypeError, match=r"images\[1\]"):
        pack([torch.zeros(3, 16, 16), torch.zeros(16, 16)], 16)
    with pytest.raises(ValueError, match="multiples of patch_size=16"):
        pack([torch.zeros(3, 16, 20)], 16)
    with pytest.raises(ValueError, match="channels"):
        pack([torch.zeros(3, 16, 16), torch.zeros(1, 16, 16)], 16)
    with pytest.raises(TypeError, match="image"):
        patchify(torch.zeros(16, 16), 16)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"dtype": "float64"}, "dtype"), ({"batch_size": 0}, "batch_size"), ({"threshold": 1.5}, "threshold")],
)
def test_align_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        align(**kwargs)
