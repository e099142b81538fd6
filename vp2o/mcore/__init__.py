"""megatron-core integration. Importing this package does not import megatron; submodules do."""
