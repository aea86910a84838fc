"""Datasets seen as lists of conversations (see tasks/common.py for the Task interface)."""
