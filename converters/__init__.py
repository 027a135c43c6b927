"""Format modules: one Reader/Writer pair per checkpoint format (installed as ckpt_ir.converters)."""
