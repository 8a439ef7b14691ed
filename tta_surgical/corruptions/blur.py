"""Corruptions: blur (filled in by the corruption engine work)."""
