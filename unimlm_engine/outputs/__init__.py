"""What results look like outside the engine: the task-result JSON schema (schema.py) and drawings
of results on images (visualize.py)."""
