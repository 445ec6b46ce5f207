"""Applied from outside the model: torch.compile (`compile`), selective recomputation (`recompute`) and
FSDP2 (`fsdp`)."""
