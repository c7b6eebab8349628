"""jsonPTS: Technotrade PTS-2 forecourt controllers (JSON over HTTP)."""
