"""Data loading: robust image reading (``images``) and datasets."""
