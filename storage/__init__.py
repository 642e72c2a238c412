"""Storage behind one repository interface (`storage.base.Storage`); `open_storage(settings)` picks the backend."""

from __future__ import annotations

from config import Settings
from storage.base import SpeakerProfile, Storage
from storage.profile_rows import ProfileLimits

__all__ = ["SpeakerProfile", "Storage", "open_storage"]


async def open_storage(settings: Settings) -> Storage:
    if settings.database_choice == "sqlite":
        from storage.sqlite import SqliteStorage

        store: Storage = SqliteStorage(settings.sqlite_path)
    elif settings.database_choice == "postgres":
        from storage.postgres import PostgresStorage

        if settings.postgres_url is None:
            raise ValueError("DATABASE_CHOICE=postgres needs POSTGRES_URL")
        store = PostgresStorage(settings.postgres_url.get_secret_value())
    elif settings.database_choice == "firestore":
        from storage.firestore import FirestoreStorage

        store = FirestoreStorage.from_settings(settings)
    else:
        raise ValueError(f"unknown DATABASE_CHOICE={settings.database_choice}: sqlite, postgres or firestore")
    store.profile_limits = ProfileLimits(settings.profile_max_embeddings, settings.profile_dedup_cosine)
    await store.open()
    return store
