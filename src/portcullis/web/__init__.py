"""HTTP concerns shared by every role's web app: security headers, limits, sessions."""
