"""The recipe: its schema, YAML with positions, loading with every problem at once, checks, docs."""
