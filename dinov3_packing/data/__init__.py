"""Images in: file discovery, decoding and preprocessing into packed rows, token-budget packing."""
