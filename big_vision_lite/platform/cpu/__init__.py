"""CPU implementations: C++ FFI kernels, their build cache, autotuning, host facts and allocator."""
