"""File-level building blocks shared by format modules (safetensors, torch zip, DCP files).

They know bytes and files, never models: naming and layout live in the format modules.
"""
