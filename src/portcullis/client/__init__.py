"""The command-line client: sign in, list resources, launch them through the gateway."""
