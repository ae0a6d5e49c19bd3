"""Load and micro benchmarks for twisted-httpwasm (see bench/README.md)."""
