"""Training: gradients, drop path, RoPE augmentation, masking and checkpointing against Hugging Face;
selective recomputation (`parallel.recompute`) against the same model without it.

Reference: `transformers.DINOv3ViTModel` with the same weights (`reference_model`), run image by image
(a clip's frames as one batch), per-image losses summed; fp32 on CPU. Tolerance: `conftest.assert_close`
(max |diff| / max |ref| <= 1e-5, row cosine >= 0.99999), the forward parity tolerance: backward runs the
same fp32 operations in another summation order, which moves gradients by ~1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tiny_config

from dinov3_packing import pack, patchify, random_packing_model, reference_model
from dinov3_packing.model import layers
from dinov3_packing.parallel.compile import compile_model, compile_stats
from dinov3_packing.parallel.recompute import RECOMPUTE_POLICIES, apply_recompute

GELU = {}
SWIGLU_NO_REG = {"use_gated_mlp": True, "hidden_act": "silu", "intermediate_size": 48, "num_register_tokens": 0}
# Sizes in patches: non-square, a 1x1 grid, a 2-frame clip.
MIXED = [(2, 3), (1, 1), (2, 2, 1), (3, 2)]


def _images(sizes, seed=0, p=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((*s[:-2], 3, s[-2] * p, s[-1] * p), generator=g) for s in sizes]


def _models(overrides, seed=0, sharp=False, **config_kw):
    """Packed model and HF reference in training mode. No RoPE augmentation unless asked, so training
    mode computes what eval mode does. `sharp` scales q and k up so attention depends on position
    (small random weights give near-uniform attention, which RoPE barely moves)."""
    config = tiny_config(**{"pos_embed_rescale": None, **overrides, **config_kw})
    model = random_packing_model(config, seed=seed).train()
    if sharp:
        with torch.no_grad():
            for layer in model.model.layer:
                layer.attention.q_proj.weight.mul_(30)
                layer.attention.k_proj.weight.mul_(30)
    return model, reference_model(model).train()


def _coefficients(images, prefix, d, seed=1):
    """Fixed random loss weights per frame, over all tokens [CLS, registers, patches]."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(img.shape[0] if img.ndim == 4 else 1, prefix + img.shape[-2] * img.shape[-1] // 256, d, generator=g)
        for img in images
    ]


def _loss(tokens, coef):
    # Linear and quadratic terms over every token: CLS, registers and patches all carry gradient.
    return (tokens * coef).sum() + 0.1 * tokens.pow(2).sum()


def _packed_tokens(out, grid):
    """Per image `[t, 1 + R + h*w, D]` tokens from a packed output (CLS, registers, patches)."""
    result, row, seg = [], 0, 0
    for t, h, w in grid.tolist():
        patches = out.last_hidden_state[row : row + t * h * w].reshape(t, h * w, -1)
        prefix = torch.cat([out.pooler_output[seg : seg + t, None], out.register_tokens[seg : seg + t]], dim=1)
        result.append(torch.cat([prefix, patches], dim=1))
        row, seg = row + t * h * w, seg + t
    return result


def _packed_backward(model, images, coefs, **kwargs):
    hidden_states, grid = pack(images, 16)
    hidden_states.requires_grad_()
    out = model(hidden_states, grid, **kwargs)
    loss = sum(_loss(tok, c) for tok, c in zip(_packed_tokens(out, grid), coefs, strict=True))
    loss.backward()
    return loss.detach(), hidden_states.grad


def _reference_backward(ref, images, coefs, masks=None):
    loss, row_grads = 0.0, []
    for i, (img, coef) in enumerate(zip(images, coefs, strict=True)):
        pixels = (img if img.ndim == 4 else img[None]).clone().requires_grad_()
        kwargs = {} if masks is None else {"bool_masked_pos": masks[i]}
        out = ref(pixels, **kwargs)
        image_loss = _loss(out.last_hidden_state, coef)
        image_loss.backward()
        loss += image_loss.detach()
        row_grads += [patchify(g, 16) for g in pixels.grad]
    return loss, torch.cat(row_grads)


def _assert_grads_equal(model, ref):
    ref_params = dict(ref.named_parameters())
    assert set(ref_params) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        r = ref_params[name]
        if r.grad is None:
            assert p.grad is None, f"{name}: packed has a gradient, HF has none"
            continue
        assert p.grad is not None, f"{name}: no gradient"
        if r.grad.numel() == 0:  # zero registers: [1, 0, D]
            assert p.grad.shape == r.grad.shape
            continue
        try:
            assert_close(p.grad, r.grad)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def _assert_backward_matches(model, ref, images) -> None:
    """The packed model's loss, input-row gradients and parameter gradients equal HF's per-image ones."""
    coefs = _coefficients(images, model.num_prefix_tokens, model.config.hidden_size)
    loss, row_grad = _packed_backward(model, images, coefs)
    ref_loss, ref_row_grad = _reference_backward(ref, images, coefs)
    assert_close(loss[None], ref_loss[None])
    assert_close(row_grad, ref_row_grad)
    _assert_grads_equal(model, ref)


@pytest.mark.parametrize("overrides", [GELU, SWIGLU_NO_REG], ids=["gelu-4reg", "swiglu-0reg"])
def test_backward_matches_hf(overrides):
    """Gradients of every parameter (by name) and of the input rows equal HF's, mixed sizes and t > 1."""
    model, ref = _models(overrides)
    _assert_backward_matches(model, ref, _images(MIXED))
    assert model.embeddings.register_tokens.grad is not None or not model.config.num_register_tokens


def test_bool_masked_pos_matches_hf_per_image():
    """iBOT-style masking on packed rows = HF's bool_masked_pos per image: outputs and gradients,
    including the mask token's."""
    model, ref = _models(GELU)
    images = _images(MIXED, seed=3)
    coefs = _coefficients(images, model.num_prefix_tokens, model.config.hidden_size)
    g = torch.Generator().manual_seed(5)
    masks = [
        torch.rand(img.shape[0] if img.ndim == 4 else 1, img.shape[-2] * img.shape[-1] // 256, generator=g) < 0.4
        for img in images
    ]
    packed_mask = torch.cat([m.flatten() for m in masks])
    assert packed_mask.any() and not packed_mask.all()
    loss, _ = _packed_backward(model, images, coefs, bool_masked_pos=packed_mask)
    ref_loss, _ = _reference_backward(ref, images, coefs, masks=masks)
    assert_close(loss[None], ref_loss[None])
    assert model.embeddings.mask_token.grad is not None and model.embeddings.mask_token.grad.abs().sum() > 0
    _assert_grads_equal(model, ref)


def test_drop_path_is_per_image_as_in_hf():
    """With drop path on, the packed model draws one keep/drop per segment per residual branch, exactly as
    HF draws per batch element: same global seed, same images -> same output. Seeds change the output,
    so the drop is live (not an identity that would trivially agree)."""
    model, ref = _models(GELU, drop_path_rate=0.5, num_hidden_layers=4)
    images = _images([(2, 2)] * 4, seed=7)
    hidden_states, grid = pack(images, 16)
    outs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        got = model(hidden_states, grid).last_hidden_state
        torch.manual_seed(seed)
        want = ref(torch.stack(images)).last_hidden_state[:, model.num_prefix_tokens :].reshape(got.shape)
        assert_close(got, want)
        outs.append(got)
    eval_out = model.eval()(hidden_states, grid).last_hidden_state
    assert not torch.allclose(outs[0], outs[1])
    assert not torch.allclose(outs[0], eval_out)


def test_drop_path_keeps_or_drops_whole_segments():
    """One block at rate sqrt(1/2): a segment skips both residual branches with probability 1/2, and
    then its patch tokens equal the final norm of its embeddings. Skipping is all-or-nothing per segment
    (every row of a segment agrees), and both outcomes occur among 12 segments."""
    model, _ = _models(GELU, drop_path_rate=0.5**0.5, num_hidden_layers=1)
    images = _images([(2, 3), (1, 2), (2, 2), (3, 1), (1, 1), (2, 1)] * 2, seed=2)
    hidden_states, grid = pack(images, 16)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(hidden_states, grid)
        skipped = model.norm(model.embeddings(hidden_states, out.layout))[out.layout.patch_index]
    row_skipped = torch.isclose(out.last_hidden_state, skipped, atol=1e-6).all(dim=1)
    per_segment = [
        rows.all().item() or not rows.any().item() for rows in row_skipped.split([h * w for _, h, w in grid.tolist()])
    ]
    skipped_segments = [rows.all().item() for rows in row_skipped.split([h * w for _, h, w in grid.tolist()])]
    assert all(per_segment)
    assert any(skipped_segments) and not all(skipped_segments), skipped_segments


def test_rope_augmentation_matches_hf_for_one_image_and_per_image():
    """Training-mode RoPE coordinate augmentation (shift, jitter, rescale): with the global RNG seeded the
    same, one image matches HF; a pack of two matches HF run on image 0 then image 1 (each segment draws its
    own augmentation, in order)."""
    aug = {"pos_embed_shift": 0.1, "pos_embed_jitter": 1.3, "pos_embed_rescale": 2.0}
    model, ref = _models(GELU, sharp=True, **aug)
    images = _images([(3, 2), (2, 4)], seed=4)
    with torch.no_grad():
        torch.manual_seed(11)
        refs = [ref(img[None]).last_hidden_state[0, model.num_prefix_tokens :] for img in images]
        hidden_states, grid = pack(images[:1], 16)
        torch.manual_seed(11)
        one = model(hidden_states, grid).last_hidden_state
        hidden_states, grid = pack(images, 16)
        torch.manual_seed(11)
        both = model(hidden_states, grid).last_hidden_state
        eval_out = model.eval()(hidden_states, grid).last_hidden_state
    assert_close(one, refs[0])
    assert_close(both, torch.cat(refs))
    # The augmentation moves the output far beyond the parity tolerance, so the agreement above is not
    # that of two unaugmented models.
    assert (both - eval_out).abs().max() > 100 * 1e-5 * eval_out.abs().max()


_MIXED_HW = [(3, 2), (1, 1), (48, 14), (14, 48), (37, 29), (2, 5)] * 7  # 42 segments: repeats, 1x1, non-square


_DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check: needs CUDA (run on the device)"),
    ),
]


@pytest.mark.parametrize("device", _DEVICES)
def test_packed_patch_coords_are_hf_coordinates_bit_for_bit(device):
    from transformers.models.dinov3_vit.modeling_dinov3_vit import get_patches_center_coordinates

    from dinov3_packing.model.layers import packed_patch_coords

    dev = torch.device(device)
    ref = torch.cat([get_patches_center_coordinates(h, w, torch.float32, dev) for h, w in _MIXED_HW])
    got = packed_patch_coords(_MIXED_HW, dev)
    assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_packed_patch_coords_divide_as_aten_does_on_cuda():
    """On CUDA, ATen computes Hugging Face's `arange(0.5, n) / n` as a product with the fp32 reciprocal of `n`
    (`div_true_kernel_cuda`, a host-scalar divisor), not as a division: the coordinates built for a CUDA device
    follow that rule (here against the rule written out in torch on the CPU; the CUDA run of the next test checks
    it against Hugging Face on the GPU), and the rule matters for these sizes (some coordinates differ)."""
    from dinov3_packing.model.layers import _packed_patch_coords

    def aten_cuda_rule(n):
        return torch.arange(0.5, n, dtype=torch.float32) * (torch.tensor(1.0) / torch.tensor(float(n)))

    parts = []
    for h, w in _MIXED_HW:
        coords = torch.stack(torch.meshgrid(aten_cuda_rule(h), aten_cuda_rule(w), indexing="ij"), dim=-1)
        parts.append(2.0 * coords.flatten(0, 1) - 1.0)
    got = torch.from_numpy(_packed_patch_coords(_MIXED_HW, reciprocal=True))
    assert torch.equal(got, torch.cat(parts))
    assert not torch.equal(got, torch.from_numpy(_packed_patch_coords(_MIXED_HW, reciprocal=False)))


@pytest.mark.parametrize("device", _DEVICES)
def test_training_rope_tables_equal_hf_augmentation_image_by_image(device):
    """The training-mode angles of a 42-segment pack, built for all segments at once, against Hugging Face's
    augmentation run image after image from the same seed (each segment's own shift, jitter, rescale, drawn in
    HF's order): equal bit for bit (the same fp32 operations on the same draws; the draws' exp runs on a strided
    [segments, 2] slice here, element by element as on HF's [2] tensor). On CUDA the draws fill 2-element slices
    of one buffer, which must take the same Philox numbers as HF's fresh [1, 2] tensors."""
    import math

    from transformers.models.dinov3_vit.modeling_dinov3_vit import (
        augment_patches_center_coordinates,
        get_patches_center_coordinates,
    )

    from dinov3_packing.model.layers import DINOv3ViTPackedRopeEmbedding
    from dinov3_packing.packing import PackedLayout

    aug = dict(pos_embed_shift=0.1, pos_embed_jitter=1.3, pos_embed_rescale=2.0)
    rope = DINOv3ViTPackedRopeEmbedding(tiny_config(**aug)).train().to(device)
    layout = PackedLayout.build([(1, h, w) for h, w in _MIXED_HW], rope.num_prefix, device)
    torch.manual_seed(11)
    got = rope.augmented_angles(layout, None)
    torch.manual_seed(11)
    parts = []
    for h, w in _MIXED_HW:
        coords = get_patches_center_coordinates(h, w, torch.float32, torch.device(device))
        coords = augment_patches_center_coordinates(coords, shift=0.1, jitter=1.3, rescale=2.0)
        angles = (2 * math.pi * coords[:, :, None] * rope.inv_freq[None, None, :]).flatten(1, 2).tile(2)
        parts.append(torch.cat([angles.new_zeros(rope.num_prefix, angles.shape[1]), angles]))
    assert torch.equal(got, torch.cat(parts))


def test_training_rope_tables_cost_a_few_ops_beyond_the_draws():
    """Building the augmented tables runs the per-segment draws (three per segment) and a fixed number of ops
    for the whole pack, not ~20 ops per segment as a loop over images would (on the GPU each is a launch, and a
    64-image ViT-L step left the device waiting on them)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dinov3_packing.model.layers import DINOv3ViTPackedRopeEmbedding
    from dinov3_packing.packing import PackedLayout

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket not in (torch.ops.aten.view, torch.ops.aten.slice, torch.ops.aten.select):
                Count.ops += 1
            return func(*args, **(kwargs or {}))

    aug = dict(pos_embed_shift=0.1, pos_embed_jitter=1.3, pos_embed_rescale=2.0)
    rope = DINOv3ViTPackedRopeEmbedding(tiny_config(**aug)).train()
    layout = PackedLayout.build([(1, h, w) for h, w in _MIXED_HW], rope.num_prefix, "cpu")
    with Count():
        rope(layout, torch.float32)
    assert 3 * len(_MIXED_HW) <= Count.ops <= 3 * len(_MIXED_HW) + 40, Count.ops


def test_rope_generator_makes_augmentation_reproducible():
    model, _ = _models(GELU, sharp=True, pos_embed_shift=0.1, pos_embed_rescale=2.0)
    hidden_states, grid = pack(_images([(2, 3), (2, 2)]), 16)
    with torch.no_grad():
        a = model(hidden_states, grid, rope_generator=torch.Generator().manual_seed(3)).last_hidden_state
        torch.rand(7)  # the global RNG moving must not matter
        b = model(hidden_states, grid, rope_generator=torch.Generator().manual_seed(3)).last_hidden_state
        c = model(hidden_states, grid, rope_generator=torch.Generator().manual_seed(4)).last_hidden_state
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 100 * 1e-5 * a.abs().max()


def test_gradient_checkpointing_gives_equal_gradients():
    """transformers' per-block checkpointing (our blocks subclass GradientCheckpointingLayer): gradients
    equal HF's, and the blocks really were recomputed (forward hooks fire twice)."""
    model, ref = _models(SWIGLU_NO_REG)
    model.gradient_checkpointing_enable()
    calls = []
    model.model.layer[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    images = _images(MIXED, seed=9)
    coefs = _coefficients(images, model.num_prefix_tokens, model.config.hidden_size)
    _, row_grad = _packed_backward(model, images, coefs)
    _, ref_row_grad = _reference_backward(ref, images, coefs)
    assert len(calls) == 2
    assert_close(row_grad, ref_row_grad)
    _assert_grads_equal(model, ref)


def peak_cpu_bytes(fn) -> int:
    """Peak of live CPU allocator bytes while `fn` runs, from the profiler's allocation events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def test_gradient_checkpointing_saves_activation_memory():
    """Peak memory of forward + backward with and without checkpointing, on a config where activations
    dominate (6 blocks, 500 tokens, width 64): checkpointing keeps one block's activations instead of
    six, so the peak must drop by more than half. Prints the measured numbers."""
    config_kw = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256, "num_hidden_layers": 6}
    images = _images([(12, 12), (8, 16), (16, 8), (4, 6)], seed=1)
    hidden_states, grid = pack(images, 16)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(hidden_states, grid).last_hidden_state.pow(2).sum().backward()

        return run

    plain, _ = _models(GELU, **config_kw)
    ckpt, _ = _models(GELU, **config_kw)
    ckpt.gradient_checkpointing_enable()
    step(plain)()  # warm-up (RoPE angle cache, allocator)
    step(ckpt)()
    peak_plain, peak_ckpt = peak_cpu_bytes(step(plain)), peak_cpu_bytes(step(ckpt))
    print(f"\npeak CPU memory fwd+bwd: {peak_plain / 2**20:.1f} MiB plain, {peak_ckpt / 2**20:.1f} MiB checkpointed")
    assert peak_ckpt < 0.5 * peak_plain


# Activations dominate here: 6 blocks, width 64, 500 tokens.
MEMORY_CONFIG = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256, "num_hidden_layers": 6}
MEMORY_SIZES = [(12, 12), (8, 16), (16, 8), (4, 6)]
# A module inside each policy's recomputed part: its forward pre-hook fires again when the part is recomputed
# (the part itself is rerun through `forward`, not `__call__`, so its own hooks fire once).
INSIDE = {
    "attention": lambda layer: layer.attention.o_proj,
    "mlp": lambda layer: layer.mlp.up_proj,
    "block": lambda layer: layer.norm1,
}


def saved_activation_bytes(model, fn) -> int:
    """Bytes autograd holds for backward at the end of `fn`'s forward: every tensor saved for backward
    (checkpoint's kept inputs included), counted once per storage, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack_hook(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("policy", list(INSIDE))
def test_recompute_gives_identical_gradients(policy):
    """Each policy: input and parameter gradients equal those without recomputation (bitwise: the same fp32
    operations run again on the same inputs), with drop path on (checkpoint restores the RNG), and the
    part really ran twice."""
    images = _images(MIXED, seed=5)
    results = []
    for recompute in (None, policy):
        model, _ = _models(GELU, drop_path_rate=0.3, num_hidden_layers=3)
        apply_recompute(model, recompute)
        calls = []
        INSIDE[policy](model.model.layer[1]).register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        hidden_states, grid = pack(images, 16)
        hidden_states.requires_grad_()
        torch.manual_seed(0)
        out = model(hidden_states, grid)
        (out.last_hidden_state.pow(2).sum() + out.pooler_output.sum()).backward()
        assert len(calls) == (2 if recompute else 1)
        results.append((hidden_states.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (row_plain, plain), (row_re, re) = results
    assert torch.equal(row_re, row_plain)
    assert plain.keys() == re.keys() and len(plain) > 20
    for name, grad in plain.items():
        assert torch.equal(re[name], grad), name


def test_recompute_saves_activation_memory():
    """Activation bytes held for backward per token: attention < none, mlp < none, block < both (the MLP's
    4D-wide tensors are the largest term, so mlp < attention). Prints the numbers (docs/training.md). ("gelu" acts on
    the fused MLP's training op only, which does not run on the CPU: test_fused_mlp.py measures it.)"""
    hidden_states, grid = pack(_images(MEMORY_SIZES, seed=1), 16)
    per_token = {}
    for policy in (None, *INSIDE):
        model, _ = _models(GELU, **MEMORY_CONFIG)
        apply_recompute(model, policy)
        saved, out = saved_activation_bytes(model, lambda m=model: m(hidden_states, grid))
        out.last_hidden_state.pow(2).sum().backward()  # what was saved is enough for backward
        per_token[policy] = saved / out.layout.num_tokens
    print(
        "\nsaved activations per token (6 blocks, width 64, fp32): "
        + ", ".join(f"{p}: {b:.0f} B" for p, b in per_token.items())
    )
    assert per_token["block"] < per_token["mlp"] < per_token["attention"] < per_token[None]


def test_recompute_rejects_bad_input():
    # Every policy is tested: those recomputing a module here, "gelu" (the fused MLP op's) in test_fused_mlp.py.
    assert RECOMPUTE_POLICIES == (None, "gelu", *INSIDE)
    model, _ = _models(GELU)
    with pytest.raises(ValueError, match="policy: expected one of"):
        apply_recompute(model, "softmax")
    with pytest.raises(TypeError, match="model: expected a DINOv3ViTPackingModel"):
        apply_recompute(torch.nn.Linear(2, 2), "mlp")
    apply_recompute(model, "mlp")
    with pytest.raises(ValueError, match="already applied"):
        apply_recompute(model, "attention")


@pytest.mark.parametrize("policy", list(INSIDE))
def test_recompute_and_transformers_checkpointing_refuse_each_other(policy):
    """In either order: transformers' checkpoint of every whole block nests around the one `apply_recompute`
    puts in (a recomputed attention or MLP ran three times a step). Both of transformers' entry points where the
    installed version has them (`activation_checkpointing_enable` is newer than the 5.4 floor); turning it
    off stays allowed; a step after the refusal runs the part twice (forward, recomputation)."""
    model, _ = _models(GELU)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing is on"):
        apply_recompute(model, policy)
    model.gradient_checkpointing_disable()
    apply_recompute(model, policy)
    entries = [e for e in ("gradient_checkpointing_enable", "activation_checkpointing_enable") if hasattr(model, e)]
    for entry in entries:
        with pytest.raises(ValueError, match=rf"apply_recompute\(model, '{policy}'\).*gradient_checkpointing_enable"):
            getattr(model, entry)()
        assert not any(layer.gradient_checkpointing for layer in model.model.layer), entry
    model.gradient_checkpointing_disable()
    calls = []
    INSIDE[policy](model.model.layer[0]).register_forward_pre_hook(lambda *_: calls.append(1))
    hidden_states, grid = pack(_images([(2, 3), (1, 2)]), 16)
    model(hidden_states, grid).last_hidden_state.pow(2).sum().backward()
    assert len(calls) == 2


def test_recompute_compiles_without_recompiling():
    """apply_recompute then compile_model: gradients equal eager recomputation (1e-5: inductor may reorder
    fp32 reductions) and packs after the two warm-up ones compile nothing."""
    torch._dynamo.reset()
    packs = [[(2, 3), (1, 1)], [(4, 3), (1, 2), (2, 2)], [(3, 3)], [(5, 2), (2, 1)]]
    eager, _ = _models(GELU, num_hidden_layers=2)
    compiled, _ = _models(GELU, num_hidden_layers=2)
    apply_recompute(eager, "mlp")
    compile_model(apply_recompute(compiled, "mlp"))
    graphs = []
    for i, sizes in enumerate(packs):
        hidden_states, grid = pack(_images(sizes, seed=i), 16)
        grads = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            model(hidden_states, grid).last_hidden_state.pow(2).sum().backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        for name, grad in grads[0].items():
            assert_close(grads[1][name], grad)
        graphs.append(compile_stats()["unique_graphs"])
    assert graphs[-1] == graphs[1], f"recompiled after warm-up: graphs per pack {graphs}"


def _random_layer_scales(model, seed=3):
    """LayerScales far from the tiny config's 1.0 (where scaling a weight is exact), with both signs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layer:
            for ls in (layer.layer_scale1, layer.layer_scale2):
                ls.lambda1.copy_(
                    (torch.rand(ls.lambda1.shape, generator=g) + 0.1)
                    * torch.sign(torch.randn(ls.lambda1.shape, generator=g))
                )


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_layer_scale_fold_matches_hf_with_random_scales(fold):
    """With LayerScales of random sizes and signs, the packed model's loss, input-row and parameter gradients equal
    HF's whether LayerScale multiplies the output projection's weight (`fold_layer_scale`, the default) or its
    output; the forward without autograd never folds."""
    model, _ = _models(GELU, drop_path_rate=0.0)
    _random_layer_scales(model)
    ref = reference_model(model).train()
    model.fold_layer_scale = fold
    _assert_backward_matches(model, ref, _images(MIXED, seed=2))


def test_layer_scale_fold_keeps_no_projection_output_for_backward():
    """Folded, autograd keeps per block and LayerScale the scaled weight ([D, D_in]) instead of the projection's
    output ([num_tokens, D]): on the CPU (the MLP unfused) that is the attention's output projection, one fewer
    [T, D] and one more [D, D] fp32 tensor per block, exactly."""
    hidden_states, grid = pack(_images(MEMORY_SIZES, seed=1), 16)
    saved = {}
    for fold in (False, True):
        model, _ = _models(GELU, **MEMORY_CONFIG)
        model.fold_layer_scale = fold
        saved[fold], out = saved_activation_bytes(model, lambda m=model: m(hidden_states, grid))
        out.last_hidden_state.pow(2).sum().backward()
    d, blocks, tokens = MEMORY_CONFIG["hidden_size"], MEMORY_CONFIG["num_hidden_layers"], out.layout.num_tokens
    assert saved[False] - saved[True] == blocks * (tokens * d - d * d) * 4


def _attach(case: str, layer, fired: list) -> None:
    """One of the things that must keep a block's first LayerScale unfolded, attached to `layer`; each appends to
    `fired` when it runs."""

    def hook(*_):
        fired.append(1)

    if case == "hooked-scale":
        layer.layer_scale1.register_forward_hook(hook)
    elif case == "hooked-proj":
        layer.attention.o_proj.register_forward_hook(hook)
    elif case == "hooked-attention":  # e.g. feature extraction: it must see the unscaled output
        layer.attention.register_forward_hook(hook)
    elif case == "backward-hooked-scale":
        layer.layer_scale1.register_full_backward_hook(hook)
    elif case == "backward-hooked-proj":
        layer.attention.o_proj.register_full_backward_hook(hook)
    elif case == "replaced-attention-forward":  # a user's wrapper with the module's (x, batch) signature
        forward = layer.attention.forward

        def wrapped(x, batch):
            fired.append(1)
            return forward(x, batch)

        layer.attention.forward = wrapped


FOLD_BLOCKERS = (
    "hooked-scale",
    "hooked-proj",
    "hooked-attention",
    "backward-hooked-scale",
    "backward-hooked-proj",
    "replaced-attention-forward",
)


@pytest.mark.parametrize("case", FOLD_BLOCKERS)
def test_layer_scale_fold_skips_a_hooked_or_replaced_module(case):
    """A LayerScale or output projection with a forward or backward hook, an attention module with a hook or a
    replaced forward: the block runs them as modules, unfolded. The hook or wrapper runs once per block and the
    gradients are those of the unfolded model bit for bit (folding changes the rounding)."""
    hidden_states, grid = pack(_images(MIXED, seed=4), 16)
    grads = {}
    for run in ("unfolded", case):
        model, _ = _models(GELU)
        _random_layer_scales(model)
        fired = []
        if run == "unfolded":
            model.fold_layer_scale = False
        else:
            for layer in model.model.layer:
                _attach(case, layer, fired)
            # The MLP's LayerScale is not touched: on the CPU the MLP is unfused, where it multiplies the output.
        model(hidden_states, grid).last_hidden_state.pow(2).sum().backward()
        assert len(fired) == (0 if run == "unfolded" else model.config.num_hidden_layers)
        grads[run] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads["unfolded"].items():
        assert torch.equal(grads[case][name], grad), name


def test_layer_scale_fold_runs_under_attention_recompute(monkeypatch):
    """The "attention" policy wraps the attention's forward in a checkpoint; the block recognises that wrapper (it
    runs the module's own forward) and still folds: autograd then keeps per block one `[num_tokens, D]` tensor
    less than unfolded (the attention output the LayerScale multiplied; the scaled weight is rebuilt inside the
    recomputed part), exactly. Compiled (`compile_model`, one graph, where the partitioner picks what to save), the
    block's decision traced by Dynamo is the same: fold, in every block."""
    hidden_states, grid = pack(_images(MEMORY_SIZES, seed=1), 16)
    saved = {}
    for fold in (False, True):
        model, _ = _models(GELU, **MEMORY_CONFIG)
        model.fold_layer_scale = fold
        apply_recompute(model, "attention")
        saved[fold], out = saved_activation_bytes(model, lambda m=model: m(hidden_states, grid))
        out.last_hidden_state.pow(2).sum().backward()
    d, blocks, tokens = MEMORY_CONFIG["hidden_size"], MEMORY_CONFIG["num_hidden_layers"], out.layout.num_tokens
    assert saved[False] - saved[True] == blocks * tokens * d * 4

    decisions = []
    decide = layers._plain_attention
    monkeypatch.setattr(layers, "_plain_attention", lambda a: decisions.append(decide(a)) or decisions[-1])
    compile_model(model)
    model(hidden_states, grid).last_hidden_state.pow(2).sum().backward()
    assert decisions == [True] * blocks


def test_fold_options_reject_a_non_bool():
    model, _ = _models(GELU)
    with pytest.raises(TypeError, match="fold_layer_scale: expected a bool, got int"):
        model.fold_layer_scale = 1
    with pytest.raises(TypeError, match="fold_qkv_bias: expected a bool, got str"):
        model.fold_qkv_bias = "yes"
    assert model.fold_qkv_bias is True


def test_unfolded_layer_scale_reads_the_forward_output_under_attention_recompute():
    """A hook that doubles every output projection's output, removed between forward and backward, with the
    attention recomputed: the projection is not folded (it has a hook), and its LayerScale's gradient is that of
    the same step without recomputation (it multiplies outside the recomputed part, by the output the forward
    computed), bit for bit."""
    hidden_states, grid = pack(_images(MIXED, seed=6), 16)
    grads = []
    for policy in (None, "attention"):
        model, _ = _models(GELU)
        _random_layer_scales(model)
        apply_recompute(model, policy)
        handles = [layer.attention.o_proj.register_forward_hook(lambda m, i, o: 2 * o) for layer in model.model.layer]
        out = model(hidden_states, grid)
        for h in handles:
            h.remove()
        out.last_hidden_state.pow(2).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    plain, recomputed = grads
    assert plain.keys() == recomputed.keys() and "model.layer.0.layer_scale1.lambda1" in plain
    for name, grad in plain.items():
        assert torch.equal(recomputed[name], grad), name


def test_gelu_policy_and_transformers_checkpointing_refuse_each_other():
    """The "gelu" policy (test_fused_mlp.py measures it) and transformers' whole-block checkpointing refuse each other
    in either order, the message saying what whole blocks would recompute."""
    model, _ = _models(GELU)
    apply_recompute(model, "gelu")
    with pytest.raises(ValueError, match=r"apply_recompute\(model, 'gelu'\).*GELU output included"):
        model.gradient_checkpointing_enable()
    model, _ = _models(GELU)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing is on"):
        apply_recompute(model, "gelu")
