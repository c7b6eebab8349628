"""Payment provider adapters over the providers' published APIs (see :mod:`.base`)."""
