"""Format modules: one Reader/Writer pair per format (installed as ``ckpt_ir.converters``)."""
