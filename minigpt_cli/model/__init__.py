"""What both phases share: the GPT and its layers, int8 weights, weight files."""
