"""Real headless Chromium fixtures (see tests/test_viewer.py)."""
