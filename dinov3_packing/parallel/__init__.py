"""Applied from outside the model: torch.compile (`compile`) and FSDP2 (`fsdp`)."""
