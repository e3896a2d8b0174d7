"""rescomp-modifiers: compensation-based weight quantizers for llm-compressor."""
