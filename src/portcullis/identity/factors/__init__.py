"""Authentication factors: each one verifies one step of a login flow."""
