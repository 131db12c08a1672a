"""Pallas kernels (see kernels/README.md): one folder per op, each with a pure-jnp reference."""
