"""LLaVA captioning library. Filled in by the captioning issue."""
