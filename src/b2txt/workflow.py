"""The pipeline's stage table (filled in below)."""
