"""The state store: SQLAlchemy Core tables, Alembic migrations and one module per family
of tables (sessions, shares, audit). SQLite by default, PostgreSQL for replicas.

Every method is synchronous; the web layer calls them in a thread pool.
"""

from wsi_server.store.audit import AuditLog, AuditRecord
from wsi_server.store.engine import Store, default_database_url
from wsi_server.store.sessions import SessionRecord, UserSessions
from wsi_server.store.shares import Share, Shares, hash_token

__all__ = [
    "AuditLog",
    "AuditRecord",
    "SessionRecord",
    "Share",
    "Shares",
    "Store",
    "UserSessions",
    "default_database_url",
    "hash_token",
]
