"""The host side: the page state (skip bitmap), the session serving one guest, the migration
engine with its loss oracle and the one driver of every migration, and reclaim (discarding hinted
free pages from the guest's memory without losing a write)."""
