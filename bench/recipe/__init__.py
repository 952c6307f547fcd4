"""The recipe: the levers, the rendered XTuner config and its read-back, tokenization, the memory model."""
