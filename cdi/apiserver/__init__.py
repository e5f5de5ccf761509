"""cdi.apiserver: CDI's own API, the part `cdi-apiserver` serves on a cluster.

`uploadtoken` answers UploadTokenRequests (create-only, nothing stored: the response carries a
PS256 upload token, `cdi.api.jwt`); `signing` keeps the key that signs them in the Secret
`cdi/cdi-api-signing-key`, made once and never replaced behind anyone's back. The embedded API
server (`cdi.kubeapi.app`) hosts them; the upload proxy, an API client, reads the public key
with `signing.load_public_key`. Nothing here imports the embedded server (`cdi.kubeapi`): this
package takes `cdi.api` and the API client `cdi.kube`, so a worker may use it too.
"""
