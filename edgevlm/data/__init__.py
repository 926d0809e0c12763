"""Datasets for training and evaluating small VLMs (torch-free: Pillow and numpy only)."""
