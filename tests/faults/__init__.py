"""Faults produced for real (issue 16); see conftest.py."""
