"""Tools that drive the layers like a user: the live demo and the benchmarks."""
