"""Upload and clone token claims (reference §6.3). Names only; signing lives with the API server."""

from __future__ import annotations

from typing import Final

ISSUER_APISERVER: Final = "cdi-apiserver"
ISSUER_DEPLOYMENT: Final = "cdi-deployment"
OPERATION_UPLOAD: Final = "Upload"
OPERATION_CLONE: Final = "Clone"
CLAIM_OPERATION: Final = "operation"
CLAIM_NAME: Final = "name"
CLAIM_NAMESPACE: Final = "namespace"
CLAIM_RESOURCE: Final = "resource"
CLAIM_PARAMS: Final = "params"
UPLOAD_TOKEN_LIFETIME_SECONDS: Final = 5 * 60
CLONE_TOKEN_LIFETIME_SECONDS: Final = 5 * 60
TOKEN_LEEWAY_SECONDS: Final = 10
SIGNING_KEY_SECRET: Final = "cdi-api-signing-key"
UPLOAD_CLIENT_NAME: Final = "client.upload-server.cdi.kubevirt.io"
