"""Corruptions: weather (filled in by the corruption engine work)."""
