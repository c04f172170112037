"""Data: reading rows (`sources`, `formats`), encoding them with a loss mask (`examples`),
packing and batching (`packing`, `batches`). Imports `hpd.files` only: never models or training."""
