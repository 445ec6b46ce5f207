"""What users run: align, embed, pca, the LLaVA tower, the benchmark suite."""
