"""cloner: the clone source worker that streams a volume sparsely (arrives with the clone issue)."""
