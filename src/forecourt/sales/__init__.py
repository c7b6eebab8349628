"""The ``sales`` context: fuel sales uploaded by edges, recorded exactly once at HQ."""
