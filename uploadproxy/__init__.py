"""uploadproxy: the authenticated streaming front door for uploads (arrives with its issue)."""
