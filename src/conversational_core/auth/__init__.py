"""Authentication (JWT) and the caller's identity and roles."""
