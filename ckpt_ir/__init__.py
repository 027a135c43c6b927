"""ckpt-ir."""
