"""SSM op layer shared by Pixel-Mamba and MambaMIL: selective scan (chunked PyTorch reference, CUDA
kernels when installed) and the Mamba mixers. Importing this package never imports mamba_ssm."""
from methods.ssm.scan import register_backend, selective_scan, selective_scan_ref

__all__ = ["register_backend", "selective_scan", "selective_scan_ref"]
