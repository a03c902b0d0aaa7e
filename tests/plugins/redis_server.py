"""Real redis-server fixtures (see tests/test_cache_redis.py)."""
