"""Corruptions: digital (filled in by the corruption engine work)."""
