"""Checkpoint I/O: Hugging Face model folders, PEFT adapters, sharded writing."""
