"""Backends that turn prompts into completions: one file each."""
