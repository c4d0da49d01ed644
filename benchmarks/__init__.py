"""maintgate's benchmarks: ``python -m benchmarks`` prints one table from one run."""
