"""Model families and the HF <-> megatron-core bridge."""
