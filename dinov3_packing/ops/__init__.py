"""Kernels behind three functions: `attention.attend(qkv, batch)`, `mlp.feed_forward(mlp, x, batch)` and, for
training, `norm.residual_layer_norm(x, h, norm, ...)`. `attention` and `mlp` hold their kernel lists, the
device/dtype/grad gate and what "auto" picks; the model imports only those functions (and `mlp`'s helpers). `attention`
imports without torch (the CLI lists its backends from it)."""
