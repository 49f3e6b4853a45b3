"""Verify service: grades final answers against ground truth (pure `grading`, process `pool`)."""
