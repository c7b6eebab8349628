"""``identity``: staff users and service accounts, their roles over scopes, sign-in with
argon2id password hashes, short signed access tokens (EdDSA, keys by kid) and rotating
refresh tokens (a reused one revokes its whole family)."""
