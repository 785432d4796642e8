"""Objectives: losses as pure functions over tensors."""
