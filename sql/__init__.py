"""consoled's alembic environment: ``env.py`` and numbered revisions in ``versions/``.

Shipped inside the wheel as ``consoled.sql``; found through
:func:`consoled.store.schema.migrations_directory`.
"""
