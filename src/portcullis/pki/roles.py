"""The common name each role's certificate carries; listeners check callers by it."""

ROLE_COMMON_NAMES = {role: f"portcullis-{role}" for role in ("gateway", "portal", "sta")}
