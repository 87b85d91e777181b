"""FTP (Fine-grained Token-wise Pruner): per-token, per-block routing with a learned router and a searched
sparsity schedule. See `methods.ftp.method` for the method and its presets."""

from methods.ftp.method import FTP

__all__ = ["FTP"]
