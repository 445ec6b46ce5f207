"""Kernels behind two functions: `attention.attend(qkv, batch)` and `mlp.feed_forward(mlp, x, batch)`. Each
module holds its kernel list, the device/dtype/grad gate and what "auto" picks; the model imports only
those functions. `attention` imports without torch (the CLI lists its backends from it)."""
