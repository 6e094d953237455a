"""Layouts and variants: single file <-> diffusers folder, split into parts, assemble."""
