"""SSM op layer shared by Pixel-Mamba and MambaMIL: selective scan (chunked PyTorch reference; mamba_ssm's
CUDA kernel when installed) and the Mamba mixers. Importing this package never imports mamba_ssm."""
from methods.ssm import backends_gpu
from methods.ssm.cuda import causal_conv1d_silu, selective_scan_cuda, supports_cuda
from methods.ssm.mixer import BiMambaMixer, SRMambaMixer, sr_reorder, sr_restore
from methods.ssm.scan import (ScanInfo, available_backends, register_backend, selective_scan,
                              selective_scan_ref)

register_backend("cuda", selective_scan_cuda, supports_cuda, priority=10)
# the sequence-parallel Triton scan for long, narrow scans (Pixel-Mamba's first layers); a no-op without
# CUDA or Triton, and triton itself is imported only when a scan uses it
backends_gpu.register()

__all__ = ["BiMambaMixer", "SRMambaMixer", "ScanInfo", "available_backends", "causal_conv1d_silu",
           "register_backend", "selective_scan", "selective_scan_ref", "sr_reorder", "sr_restore"]
