"""The common name each role's certificate carries; listeners check callers by it."""

ROLES = ("gateway", "portal", "sta", "relay", "shadow-hub")
ROLE_COMMON_NAMES = {role: f"portcullis-{role}" for role in ROLES}
