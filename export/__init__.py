"""PyTorch / transformers checkpoint -> edgevlm bundle. Needs the `export` extra (torch)."""
