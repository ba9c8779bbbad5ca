"""GPU runs on a lent NVIDIA machine: prepare here, run there (bench/gpu/device.sh)."""
