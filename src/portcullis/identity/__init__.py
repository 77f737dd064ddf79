"""Identity: who the user is (login flows and factors), claims, and sessions."""
