"""cloner: the clone source worker (`cdi-cloner`). Reads a volume sparsely and streams it to the
upload server on the clone target (reference §7.3).

Modules: `settings` (the pod's environment), `extents` (the sparse extent stream, kubevirt
content), `stream` (what goes on the wire: extents or a tar, maybe zstd, as an async body),
`client` (mutual TLS and the POST), `metrics` (the progress metric), `errors` (exit statuses),
`main` (the entry point).
Imports only cdi.api and cdi.image of ours (never the importer: workers are independent).
"""
