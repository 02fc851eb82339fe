"""Tachyon's benchmarks: kernel micro-benchmarks (pytest bench/) and end-to-end throughput."""
