"""The Secure Ticket Authority: one-time tickets that stand in for server addresses."""
