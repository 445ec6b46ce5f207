"""Alignment tool: the packed model against Hugging Face `DINOv3ViTModel` run image by image.

Every test packs its images into one batch, runs the packed model once, runs the reference once per image
(frame) and compares the patch tokens and CLS token. fp32 is checked tightly (max |diff| / max |ref|);
with `--dtype bfloat16` the packed model runs in bf16 against the fp32 reference and only cosine is bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DINOv3ViTModel

from ..data.files import image_paths_in, load_at_patch_multiple, sample_image_paths
from ..model.modeling import DINOv3ViTPackingModel
from ..packing import pack, split
from ..weights.load import DEFAULT_CKPT, load_checkpoint, parse_device, reference_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP32_RTOL = 1e-5  # fp32 packed vs fp32 reference: only summation order differs (observed ~1e-6)


@dataclass
class Comparison:
    name: str
    max_diff: float
    mean_diff: float
    rel_diff: float
    cos: torch.Tensor  # per token cosine similarities

    def line(self) -> str:
        return (
            f"{self.name:<28} max {self.max_diff:.3e}  mean {self.mean_diff:.3e}  rel {self.rel_diff:.3e}  "
            f"cos min {self.cos.min():.8f} mean {self.cos.mean():.8f}"
        )


def compare(name: str, got: list[torch.Tensor], ref: list[torch.Tensor]) -> Comparison:
    """Compare lists of `[tokens, D]` tensors (got may be lower precision; compared in fp32)."""
    g = torch.cat([x.float().reshape(-1, x.shape[-1]) for x in got])
    r = torch.cat([x.float().reshape(-1, x.shape[-1]) for x in ref])
    diff = (g - r).abs()
    return Comparison(
        name,
        float(diff.max()),
        float(diff.mean()),
        float(diff.max() / r.abs().max()),
        F.cosine_similarity(g, r, dim=-1),
    )


def random_tests(batch_size: int, image_size: int, p: int, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Random-tensor packs: uniform, non-square, mixed sizes (a 1x1 grid among them) and a 2-frame clip."""
    g = torch.Generator().manual_seed(seed)
    side = max(p, image_size // p * p)
    half = max(p, side // 2 // p * p)  # side // 2 itself need not be a patch multiple (48 -> 24)

    def img(h: int, w: int, t: int = 0) -> torch.Tensor:
        shape = (3, h, w) if t == 0 else (t, 3, h, w)
        return torch.randn(shape, generator=g)

    return {
        f"uniform {batch_size}x{side}": [img(side, side) for _ in range(batch_size)],
        "non-square": [img(side, side + 2 * p), img(half + p, side)],
        "mixed sizes": [img(side, side), img(p, p), img(3 * p, 5 * p), img(side + p, half + p), img(2 * p, p)],
        "clip t=2 + image": [img(half + p, side, t=2), img(side, 2 * p)],
    }


@torch.no_grad()
def run_test(
    packed: DINOv3ViTPackingModel, ref: DINOv3ViTModel, images: list[torch.Tensor]
) -> tuple[Comparison, Comparison]:
    """One packed forward of `images` against the reference run image by image (a clip's frames batched)."""
    hidden_states, grid = pack(images, packed.patch_size)
    out = packed(hidden_states.to(packed.device, packed.dtype), grid.to(packed.device))
    got_maps = split(out.last_hidden_state, grid)
    ref_patches, ref_cls = [], []
    for img in images:
        frames = img if img.ndim == 4 else img[None]
        r = ref(frames.to(ref.device, ref.dtype))
        ref_patches.append(r.last_hidden_state[:, packed.num_prefix_tokens :].cpu())
        ref_cls.append(r.pooler_output.cpu())
    patches = compare("patches", [m.cpu() for m in got_maps], ref_patches)
    cls = compare("cls", [out.pooler_output.cpu()], [torch.cat(ref_cls)])
    return patches, cls


def align(
    ckpt: str = DEFAULT_CKPT,
    device: str = "cpu",
    batch_size: int = 2,
    image_size: int = 224,
    threshold: float = 0.99,
    use_real_images: bool = False,
    image_dir: str | None = None,
    dtype: str = "float32",
    rtol: float | None = None,
    attn_backend: str = "auto",
) -> bool:
    """Run the alignment tests and print a report; returns True when every test passes."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    if image_size < 16:
        raise ValueError(f"image_size: expected at least one patch (16 px), got {image_size}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold: expected a cosine similarity in (0, 1], got {threshold}")
    if rtol is None and dtype == "float32":
        rtol = FP32_RTOL
    bar = "=" * 80
    print(bar, "DINOv3 ViT Packing Alignment Script", bar, sep="\n")
    print(f"Model checkpoint: {ckpt}\nDevice: {device}\nPacked dtype: {dtype} (reference: float32)")
    print(f"Similarity threshold: {threshold}" + (f"\nMax relative diff: {rtol}" if rtol else ""))

    target = parse_device(device)
    # One load: the fp32 reference copies the weights before the packed model moves to its dtype.
    loaded = load_checkpoint(ckpt, "cpu", torch.float32, attn_backend)
    ref = reference_model(loaded.model).to(target)
    packed = loaded.model.to(device=target, dtype=DTYPES[dtype])
    print(
        f"Patch size: {packed.patch_size}  hidden size: {packed.config.hidden_size}  "
        f"registers: {packed.config.num_register_tokens}\n"
    )

    tests = random_tests(batch_size, image_size, packed.patch_size)
    if use_real_images:
        paths = image_paths_in(image_dir) if image_dir else sample_image_paths()
        tests["real images"] = [load_at_patch_multiple(p, packed.patch_size, loaded.mean, loaded.std) for p in paths]
        print(f"Real images: {len(paths)} from {image_dir or 'the bundled samples'}")

    failures, results = [], []
    for name, images in tests.items():
        patches, cls = run_test(packed, ref, images)
        results.append(patches)
        for c in (patches, cls):
            c.name = f"{name} [{c.name}]"
            print(c.line())
            if c.cos.min() < threshold or (rtol is not None and c.rel_diff > rtol):
                failures.append(c)

    all_cos = torch.cat([r.cos for r in results])
    print(bar, "Results", bar, sep="\n")
    print(f"Max Diff:        {max(r.max_diff for r in results):.6f}")
    print(f"Mean Diff:       {sum(r.mean_diff for r in results) / len(results):.6f}")
    print(f"Max Rel Diff:    {max(r.rel_diff for r in results):.3e}")
    print(f"Min Cosine Sim:  {all_cos.min():.8f}")
    print(f"Mean Cosine Sim: {all_cos.mean():.8f}")
    print(f"Max Cosine Sim:  {all_cos.max():.8f}")
    if failures:
        for c in failures:
            print(
                f"FAIL: {c.name}: min cosine {c.cos.min():.8f} (threshold {threshold}), "
                f"relative diff {c.rel_diff:.3e} (limit {rtol})"
            )
        return False
    print("\nALL TESTS PASSED: Models are aligned")
    return True
